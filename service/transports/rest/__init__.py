"""REST transport: the FastAPI app, its middleware, schemas and error handlers."""
