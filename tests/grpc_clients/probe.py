#!/usr/bin/env python3
"""Calls a Fabric gRPC server the way any Python program would: grpcio with
default channel options (gRPC C-core picks the :authority), the stock
reflection v1alpha client to list services and fetch descriptors, the stock
health client, and each requested method through a generic unary call whose
request and response types come from reflection.

    probe.py TARGET [--call fabric.v1.Service.Method JSON_REQUEST]...

TARGET is a gRPC target such as unix:/run/fabric/controller.sock. Prints
one JSON object on stdout:

    {"services": [...], "health": {"": "SERVING", "fabric.v1.X": ...},
     "calls": [{"method": "...", "response": {...}}]}

Exit status: 0 when every step answered, 1 when a call failed (the reason
on stderr), 3 when the Python packages are missing (how to install them on
stderr).
"""

import argparse
import json
import sys

REQUIREMENTS = "tests/grpc_clients/requirements.txt"

try:
    import grpc
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
except ImportError as missing:
    print(
        f"probe.py: Python packages missing ({missing}): install them with "
        f"`bash scripts/deps.sh --pip {REQUIREMENTS}` (scripts/test does)",
        file=sys.stderr,
    )
    sys.exit(3)

TIMEOUT_S = 20


def fail(step, error):
    if isinstance(error, grpc.RpcError):
        error = f"{error.code().name}: {error.details()}"
    print(f"probe.py: {step}: {error}", file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument(
        "--call", nargs=2, action="append", default=[], metavar=("METHOD", "JSON")
    )
    args = parser.parse_args()

    # Default options on purpose: no grpc.default_authority override.
    channel = grpc.insecure_channel(args.target)
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
    except grpc.FutureTimeoutError:
        fail("connect", f"{args.target} not ready after {TIMEOUT_S} s")

    reflection = ProtoReflectionDescriptorDatabase(channel)
    try:
        services = sorted(reflection.get_services())
    except grpc.RpcError as error:
        fail("reflection v1alpha: list services", error)

    health = health_pb2_grpc.HealthStub(channel)
    statuses = {}
    for service in [""] + [s for s in services if s.startswith("fabric.")]:
        try:
            answer = health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            fail(f"health of {service!r}", error)
        statuses[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(
            answer.status
        )

    pool = descriptor_pool.DescriptorPool(reflection)
    calls = []
    for method_name, request_json in args.call:
        try:
            method = pool.FindMethodByName(method_name)
        except KeyError as error:
            fail(f"reflection v1alpha: describe {method_name}", error)
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            request = json_format.Parse(request_json, request_type())
        except json_format.ParseError as error:
            fail(f"{method_name}: request {request_json}", error)
        try:
            response = call(request, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            fail(method_name, error)
        calls.append(
            {"method": method_name, "response": json_format.MessageToDict(response)}
        )

    json.dump({"services": services, "health": statuses, "calls": calls}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
