#!/usr/bin/env python3
"""Valid NodeExecutionEntry lines with large inputs, for measuring the worker's memory.

usage: large-inputs.py N BYTES | credit-worker publish -

Each of the N lines is about BYTES long: a text-generation block's inputs with an array of
small integers (the decoded form that weighs most, about 15 times its text), across 10 users.
"""
import json
import sys

n, size = int(sys.argv[1]), int(sys.argv[2])
values = list(range(10)) * (size // 20)  # "0,1,…": about 2 bytes an element
for i in range(n):
    entry = {
        "user_id": f"mu{i % 10}", "graph_exec_id": "g", "graph_id": "g",
        "node_exec_id": f"mem-{i}", "node_id": "n",
        "block_id": "1f292d4a-41a4-4977-9684-7c8d560b9f91",
        "inputs": {"model": "gpt-4o", "prompt": "hi", "values": values},
        "execution_context": {"blob": values[:1000]},
    }
    print(json.dumps(entry, separators=(",", ":")))
