"""Standard gRPC health checking and server reflection."""

from __future__ import annotations

from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def test_health_serving(gateway):
    stub = health_pb2_grpc.HealthStub(gateway.channel())
    # "": readiness (follows the model server on Triton); "liveness": the process answers.
    for service in ("", "steerserve.v1.SteerServe", "liveness"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(gateway):
    stub = reflection_pb2_grpc.ServerReflectionStub(gateway.channel())
    responses = list(
        stub.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="steerserve.v1.SteerServe"),
                ]
            )
        )
    )
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"steerserve.v1.SteerServe", "grpc.health.v1.Health"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in responses[1].file_descriptor_response.file_descriptor_proto]
    service = next(f for f in files if f.package == "steerserve.v1").service[0]
    assert {"Generate", "Personalize", "WatchJob", "Edit", "ImportAdapter"} <= {m.name for m in service.method}
