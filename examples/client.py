#!/usr/bin/env python3
"""A small svfit gRPC client: streams an answer with an adapter.

    pip install grpcio grpcio-tools
    python3 examples/client.py --adapter demo "What is the capital of France?"

The stubs are generated from proto/ at start (grpcio-tools), so nothing
else needs building. Options: --addr HOST:PORT, --adapter ID (empty: the
base model), --key API_KEY, --max-tokens N, --temperature T.
"""

import argparse
import os
import sys
import tempfile

from grpc_tools import protoc
import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_stubs():
    out = tempfile.mkdtemp(prefix="svfit-stubs-")
    proto_dir = os.path.join(ROOT, "proto")
    status = protoc.main([
        "protoc",
        f"-I{proto_dir}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_dir, "svfit", "v1", "svfit.proto"),
    ])
    if status != 0:
        sys.exit("error: could not compile proto/svfit/v1/svfit.proto")
    sys.path.insert(0, out)
    from svfit.v1 import svfit_pb2, svfit_pb2_grpc
    return svfit_pb2, svfit_pb2_grpc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--addr", default="localhost:50051")
    parser.add_argument("--adapter", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()

    pb, rpc = load_stubs()
    channel = grpc.insecure_channel(args.addr)
    client = rpc.InferenceStub(channel)
    request = pb.GenerateRequest(
        adapter=args.adapter,
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=args.question)]),
        sampling=pb.Sampling(temperature=args.temperature),
        max_tokens=args.max_tokens,
    )
    metadata = [("authorization", f"Bearer {args.key}")] if args.key else []
    try:
        for chunk in client.GenerateStream(request, metadata=metadata):
            print(chunk.text, end="", flush=True)
            if chunk.finish_reason:
                print(f"\n[{chunk.finish_reason}: {chunk.usage.completion_tokens} tokens, "
                      f"first token after {chunk.timings.time_to_first_token_ms:.0f} ms, "
                      f"adapter {chunk.adapter_version or 'base'}]")
    except grpc.RpcError as e:
        sys.exit(f"error: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
