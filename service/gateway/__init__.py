"""The gRPC gateway: authenticates, validates and routes SteerServe RPCs to a backend."""
