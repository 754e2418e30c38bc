"""gRPC transport: the Ranker service, health and reflection; stubs generated from `proto/`."""
