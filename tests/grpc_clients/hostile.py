#!/usr/bin/env python3
"""A hostile client of a Fabric controller, in another language than the
project's (issue 15): Python grpcio, every type taken from the server's
reflection (no generated stubs). Each case sends what the controller must
refuse and checks the status code and that its details name the limit
(docs/limits.md); then checks that the controller still serves and that no
refused request created anything.

    hostile.py TARGET

TARGET is a gRPC target such as unix:/tmp/x/controller.sock, of a controller
with no hosts and no VMs. Prints one JSON object on stdout:

    {"cases": [{"case": "...", "code": "...", "details": "...", "ok": true,
                "failure": "..."}...], "after": {...}, "failures": [...]}

Exit status: 0 when every expectation held, 1 when one did not (each reason
in "failures" and on stderr), 3 when the Python packages are missing (how to
install them on stderr).
"""

import json
import sys
import threading
import time

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
        f"hostile.py: Python packages missing ({missing}): install them with "
        f"`bash scripts/deps.sh --pip {REQUIREMENTS}` (scripts/test does)",
        file=sys.stderr,
    )
    sys.exit(3)

TIMEOUT_S = 20
MIB = 1 << 20
# The controller's limits (docs/limits.md), as its refusals name them.
MAX_SPEC_BYTES = 16384
MAX_MESSAGE = 4194304
MAX_WATCHERS = 256
MAX_PUSHES = 8
WATCHERS_TRIED = 300
PUSHES_TRIED = 12

# The server, not this client, is to refuse what is too large: no send limit
# (grpcio's default is none, said here on purpose).
OPTIONS = [("grpc.max_send_message_length", -1)]


class Fabric:
    """Calls of fabric.v1 methods, typed from the server's reflection."""

    def __init__(self, target, options=()):
        self.channel = grpc.insecure_channel(target, options=list(OPTIONS) + list(options))
        grpc.channel_ready_future(self.channel).result(timeout=TIMEOUT_S)
        self.pool = descriptor_pool.DescriptorPool(
            ProtoReflectionDescriptorDatabase(self.channel)
        )

    def method(self, name):
        method = self.pool.FindMethodByName(name)
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        path = f"/{method.containing_service.full_name}/{method.name}"
        kind = {
            (False, False): self.channel.unary_unary,
            (False, True): self.channel.unary_stream,
            (True, False): self.channel.stream_unary,
        }[(method.client_streaming, method.server_streaming)]
        call = kind(
            path,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        return call, request

    def request(self, name, fields):
        """A request of method `name` from a dict of its JSON fields."""
        return json_format.ParseDict(fields, self.method(name)[1]())

    def call(self, name, fields, timeout=TIMEOUT_S):
        call, _ = self.method(name)
        return call(self.request(name, fields), timeout=timeout)

    def close(self):
        self.channel.close()


class Report:
    def __init__(self):
        self.cases = []
        self.failures = []

    def fail(self, case, reason):
        self.failures.append(f"{case}: {reason}")
        print(f"hostile.py: {case}: {reason}", file=sys.stderr)

    def refused(self, case, code, names, attempt):
        """Runs `attempt`, which must raise a grpc.RpcError of `code` whose
        details contain each of `names`."""
        entry = {"case": case, "expected": code.name, "names": names}
        started = time.monotonic()
        try:
            attempt()
        except grpc.RpcError as error:
            entry["code"] = error.code().name
            # Details can quote what was sent: keep the report short.
            entry["details"] = (error.details() or "")[:300]
            missing = [n for n in names if n not in (error.details() or "")]
            if error.code() != code:
                entry["failure"] = f"got {error.code().name}, expected {code.name}"
            elif missing:
                entry["failure"] = f"the details do not name {missing}"
        else:
            entry["code"] = "OK"
            entry["failure"] = f"accepted; expected {code.name}"
        entry["seconds"] = round(time.monotonic() - started, 3)
        entry["ok"] = "failure" not in entry
        if not entry["ok"]:
            self.fail(case, entry["failure"] + f" ({entry.get('details', '')[:200]!r})")
        self.cases.append(entry)


def vm_spec(name, **extra):
    """A spec the controller accepts (a kernel never run: no host runs it)."""
    spec = {
        "name": name,
        "vcpus": 1,
        "memory": {"startupMib": "256"},
        "image": {"kernelSha256": "0" * 64},
    }
    spec.update(extra)
    return {"spec": spec}


def register(machine_id="machine-hostile", name="hostile", **extra):
    request = {
        "machineId": machine_id,
        "name": name,
        "zone": "z1",
        "capacity": {"cpus": 2, "memoryMib": "1024"},
        "allocatable": {"cpus": 2, "memoryMib": "1024"},
    }
    request.update(extra)
    return request


def judge_refusals(case, calls, expected_refused, limit):
    """Waits for `expected_refused` of the streaming `calls` to end, then
    judges them: exactly that many, each RESOURCE_EXHAUSTED naming `limit`
    (e.g. "256 event watchers"), the others still served. Returns the report
    entry and the failure (None when as expected)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if sum(c.done() for c in calls) >= expected_refused:
            break
        time.sleep(0.05)
    time.sleep(1)  # any more refusals than expected would show by now
    ended = [c for c in calls if c.done()]
    codes = {}
    for c in ended:
        codes[c.code().name] = codes.get(c.code().name, 0) + 1
    served = len(calls) - len(ended)
    entry = {
        "case": case,
        "expected": f"{expected_refused} RESOURCE_EXHAUSTED, {len(calls) - expected_refused} served",
        "codes": codes,
        "served": served,
    }
    if ended:
        entry["details"] = ended[0].details()
    failure = None
    if len(ended) != expected_refused or codes.get("RESOURCE_EXHAUSTED") != expected_refused:
        failure = f"ended: {codes}, expected {expected_refused} RESOURCE_EXHAUSTED"
    elif any(limit not in (c.details() or "") for c in ended):
        failure = f"a refusal does not name the limit ({limit})"
    return entry, failure


def watchers_beyond_the_limit(target, report):
    """WATCHERS_TRIED WatchEvents streams, never read, on two connections (one
    connection carries at most 256 streams at once: more would wait in the
    client, never reaching the server): MAX_WATCHERS are served, the rest
    refused naming the limit; once closed, a new watcher is served."""
    case = f"{WATCHERS_TRIED} WatchEvents streams never read"
    started = time.monotonic()
    # A subchannel pool of its own each: two connections, not one shared.
    clients = [
        Fabric(target, [("grpc.use_local_subchannel_pool", 1)]) for _ in range(2)
    ]
    calls = []
    for i in range(WATCHERS_TRIED):
        client = clients[i % 2]
        method, _ = client.method("fabric.v1.Compute.WatchEvents")
        calls.append(method(client.request("fabric.v1.Compute.WatchEvents", {})))
    entry, failure = judge_refusals(
        case, calls, WATCHERS_TRIED - MAX_WATCHERS, f"{MAX_WATCHERS} event watchers"
    )
    for c in calls:
        c.cancel()
    for client in clients:
        client.close()
    # Served again once they are gone: a watcher served gets no event in a
    # second (DEADLINE_EXCEEDED), a refused one RESOURCE_EXHAUSTED.
    if failure is None:
        failure = "after closing them, no new watcher was served within 20 s"
        fabric = Fabric(target)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                for _ in fabric.call("fabric.v1.Compute.WatchEvents", {}, timeout=1):
                    pass
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    failure = None
                    break
            time.sleep(0.2)
        fabric.close()
    entry["seconds"] = round(time.monotonic() - started, 3)
    entry["ok"] = failure is None
    if failure:
        entry["failure"] = failure
        report.fail(case, failure)
    report.cases.append(entry)


def pushes_beyond_the_limit(fabric, report):
    """PUSHES_TRIED pushes that send a header and then wait: MAX_PUSHES are
    served (they wait for data), the rest refused naming the limit."""
    case = f"{PUSHES_TRIED} image pushes at once"
    started = time.monotonic()
    push, request_type = fabric.method("fabric.v1.Images.PushImage")
    release = threading.Event()

    def parts(i):
        yield json_format.ParseDict(
            {
                "header": {
                    "imageName": "hostile",
                    "role": "IMAGE_FILE_ROLE_DISK",
                    "sha256": f"{i:064x}",
                    "sizeBytes": str(MIB),
                    "fileName": "disk.img",
                }
            },
            request_type(),
        )
        release.wait(TIMEOUT_S * 2)

    calls = [push.future(parts(i), timeout=TIMEOUT_S * 2) for i in range(PUSHES_TRIED)]
    entry, failure = judge_refusals(
        case, calls, PUSHES_TRIED - MAX_PUSHES, f"{MAX_PUSHES} image pushes"
    )
    for c in calls:
        c.cancel()
    release.set()
    entry["seconds"] = round(time.monotonic() - started, 3)
    entry["ok"] = failure is None
    if failure:
        entry["failure"] = failure
        report.fail(case, failure)
    report.cases.append(entry)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    target = sys.argv[1]
    report = Report()
    try:
        fabric = Fabric(target)
    except grpc.FutureTimeoutError:
        print(f"hostile.py: {target} not ready after {TIMEOUT_S} s", file=sys.stderr)
        sys.exit(1)

    # One good host to cordon (the only thing the run may create).
    good = fabric.call("fabric.v1.HostLink.RegisterHost", register("machine-good", "good"))
    host_id = good.host_id

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    create = lambda request: lambda: fabric.call("fabric.v1.Compute.CreateVm", request)
    report.refused(
        "CreateVm with a NIC network name of 1 MiB",
        invalid,
        [f"at most {MAX_SPEC_BYTES}"],
        create(vm_spec("huge-nic", nics=[{"network": "n" * MIB}])),
    )
    report.refused(
        "CreateVm with a spec of 20 KiB in labels and command line",
        invalid,
        ["spec:", "bytes encoded", f"at most {MAX_SPEC_BYTES}"],
        create(
            vm_spec(
                "many-labels",
                kernelCmdline="x" * 2000,
                placement={
                    "labels": {f"k{i:062d}": "v" * 63 for i in range(140)},
                },
            )
        ),
    )
    report.refused(
        "CreateVm with 65 small labels",
        invalid,
        ["spec.placement", "at most 64 labels"],
        create(
            vm_spec("labels-65", placement={"labels": {f"k{i}": "v" for i in range(65)}})
        ),
    )
    report.refused(
        "CreateVm with a zone of bad characters",
        invalid,
        ["spec.placement.zone", "63 of [A-Za-z0-9._-]"],
        create(vm_spec("bad-zone", placement={"zone": "z1; rm -rf /\n\u00e9"})),
    )
    report.refused(
        "CordonHost with a reason of 100 KiB",
        invalid,
        ["reason", "at most 256 bytes"],
        lambda: fabric.call(
            "fabric.v1.Compute.CordonHost", {"id": host_id, "reason": "r" * (100 << 10)}
        ),
    )
    report.refused(
        "CreateVm in a message of 5 MiB",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        [str(MAX_MESSAGE)],
        create(vm_spec("five-mib", kernelCmdline="x" * (5 * MIB))),
    )
    register_host = lambda request: lambda: fabric.call(
        "fabric.v1.HostLink.RegisterHost", request
    )
    report.refused(
        "RegisterHost with 10,000 labels",
        invalid,
        ["labels", "at most 64"],
        register_host(register(labels={f"k{i}": "v" for i in range(10_000)})),
    )
    report.refused(
        "RegisterHost with a machine id of 1 MiB",
        invalid,
        ["machine_id", "at most 128"],
        register_host(register(machine_id="m" * MIB)),
    )
    # Refusals that quote what they refuse: gRPC C-core drops response metadata
    # over 8 KiB (soft) to 16 KiB (hard) and reports RESOURCE_EXHAUSTED of its
    # own instead of the server's status, unless the server bounds the message.
    report.refused(
        "RegisterHost with a label value of 100 KB",
        invalid,
        ["labels", "0..=63"],
        register_host(register(labels={"rack": "r" * 100_000})),
    )
    report.refused(
        "GetVm with an id of 1 MiB",
        grpc.StatusCode.NOT_FOUND,
        ["no VM with id"],
        lambda: fabric.call("fabric.v1.Compute.GetVm", {"id": "v" * MIB}),
    )
    push, push_request = fabric.method("fabric.v1.Images.PushImage")
    header = {
        "imageName": "hostile",
        "role": "IMAGE_FILE_ROLE_DISK",
        "sha256": "f" * MIB,
        "sizeBytes": "1",
    }
    report.refused(
        "PushImage with a sha256 of 1 MiB",
        invalid,
        ["sha256", "64 lowercase hex characters"],
        lambda: push(
            iter([json_format.ParseDict({"header": header}, push_request())]),
            timeout=TIMEOUT_S,
        ),
    )
    watchers_beyond_the_limit(target, report)
    pushes_beyond_the_limit(fabric, report)

    # It serves on, and nothing refused was created.
    after = {}
    health = health_pb2_grpc.HealthStub(fabric.channel)
    after["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S).status
    )
    if after["health"] != "SERVING":
        report.fail("after", f"health {after['health']}")
    vms = json_format.MessageToDict(fabric.call("fabric.v1.Compute.ListVms", {}))
    after["vms"] = vms.get("vms", [])
    if after["vms"]:
        report.fail("after", f"VMs were created: {after['vms']}")
    hosts = json_format.MessageToDict(fabric.call("fabric.v1.Compute.ListHosts", {}))
    after["hosts"] = [(h["name"], h.get("state")) for h in hosts.get("hosts", [])]
    if [h[0] for h in after["hosts"]] != ["good"]:
        report.fail("after", f"hosts other than the good one: {after['hosts']}")
    if any(h[1] == "HOST_STATE_CORDONED" for h in after["hosts"]):
        report.fail("after", "the refused cordon cordoned the host")
    images = json_format.MessageToDict(fabric.call("fabric.v1.Images.ListImages", {}))
    after["images"] = images.get("images", [])
    if after["images"]:
        report.fail("after", f"images were created: {after['images']}")
    # Every retained event (sequences start far above 1): until a second of
    # silence.
    events = []
    try:
        for event in fabric.call(
            "fabric.v1.Compute.WatchEvents", {"sinceSequence": "1"}, timeout=1
        ):
            events.append(json_format.MessageToDict(event))
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            report.fail("after", f"WatchEvents: {error.code().name}: {error.details()}")
    after["events"] = [(e.get("kind"), e.get("hostId", "")) for e in events]
    created = [
        e for e in events
        if e.get("kind") in ("EVENT_KIND_VM_CREATED", "EVENT_KIND_HOST_REGISTERED")
        and e.get("hostId") != host_id
    ]
    if created:
        report.fail("after", f"events of creation: {created}")
    fabric.close()

    json.dump(
        {"cases": report.cases, "after": after, "failures": report.failures},
        sys.stdout,
    )
    print()
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
