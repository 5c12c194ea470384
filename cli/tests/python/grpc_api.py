"""Drives the gateway's gRPC service with Python's grpcio, stubs generated from our .proto.

Run by cli/tests/it/api.rs with:
  GRPC_ADDR  127.0.0.1:PORT
  PROTO_DIR  directory holding gateway.proto
  EXPECTED   JSON: {"chat_prompt", "chat_text", "tokens", "peers"} (greedy local reference
             and the number of peers the swarm has)
Also checks the standard health service and server reflection (a descriptor fetched over the
wire, not from our files).
"""

import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from google.protobuf.descriptor_pool import DescriptorPool

addr = os.environ["GRPC_ADDR"]
expected = json.loads(os.environ["EXPECTED"])
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


out = tempfile.mkdtemp()
rc = protoc.main(["protoc", f"-I{os.environ['PROTO_DIR']}", f"--python_out={out}",
                  f"--grpc_python_out={out}", "gateway.proto"])
check(rc == 0, "protoc failed")
sys.path.insert(0, out)
import gateway_pb2  # noqa: E402
import gateway_pb2_grpc  # noqa: E402

channel = grpc.insecure_channel(addr)
stub = gateway_pb2_grpc.GatewayStub(channel)

# Health: the swarm covers every block, so the service is SERVING.
health = health_pb2_grpc.HealthStub(channel)
status = health.Check(health_pb2.HealthCheckRequest(service="edge_swarm.gateway.v1.Gateway"),
                      timeout=30).status
check(status == health_pb2.HealthCheckResponse.SERVING, f"health {status}")

# Swarm status.
s = stub.SwarmStatus(gateway_pb2.SwarmStatusRequest(), timeout=30)
check(s.complete and s.block_count == 30, f"status complete={s.complete} blocks={s.block_count}")
check(len([p for p in s.peers if p.state == "online"]) == expected["peers"], f"peers {s.peers}")
check(list(s.servers_per_block) == [1] * 30, f"servers per block {list(s.servers_per_block)}")

# Streaming generation, greedy: the local reference, in several messages.
req = gateway_pb2.GenerateRequest(
    messages=[gateway_pb2.ChatMessage(role="user", content=expected["chat_prompt"])],
    max_tokens=expected["tokens"], temperature=0.0)
msgs = list(stub.Generate(req, timeout=120))
text = "".join(m.text for m in msgs)
check(text == expected["chat_text"], f"grpc text {text!r} != {expected['chat_text']!r}")
check(len(msgs) > 2, f"{len(msgs)} messages")
last = msgs[-1]
check(last.finish_reason == gateway_pb2.FINISH_REASON_LENGTH, f"finish {last.finish_reason}")
check(last.usage.completion_tokens == expected["tokens"], f"usage {last.usage}")
check(len(last.route) == expected["peers"], f"route {list(last.route)}")

# A bad request is INVALID_ARGUMENT with a message, not a dropped connection.
try:
    list(stub.Generate(gateway_pb2.GenerateRequest(max_tokens=4), timeout=30))
    check(False, "empty request accepted")
except grpc.RpcError as e:
    check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"empty request: {e.code()}")
    check("prompt" in e.details(), f"details {e.details()}")

# Reflection: list the services and resolve the Gateway's methods from the server alone.
db = ProtoReflectionDescriptorDatabase(channel)
services = db.get_services()
check("edge_swarm.gateway.v1.Gateway" in services and "grpc.health.v1.Health" in services,
      f"services {services}")
pool = DescriptorPool(db)
svc = pool.FindServiceByName("edge_swarm.gateway.v1.Gateway")
methods = sorted(m.name for m in svc.methods)
check(methods == ["Generate", "SwarmStatus"], f"methods {methods}")
check(svc.methods_by_name["Generate"].output_type.full_name
      == "edge_swarm.gateway.v1.GenerateResponse", "Generate output type")

print(f"ok: {checks} checks")
