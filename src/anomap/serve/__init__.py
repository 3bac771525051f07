"""The prediction service (``anomap serve``): ``anomap.serve.app.create_app`` builds the FastAPI app.

Needs the ``serve`` extra: ``pip install 'anomap[serve]'``.
"""
