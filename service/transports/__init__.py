"""The two ways in: REST (`rest`, FastAPI) and gRPC (`grpc`), thin adapters over `service.core`."""
