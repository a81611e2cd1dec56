"""
Ask a running triton_server over the v2 gRPC protocol; print one JSON document of what it said.

Runs in the Triton environment (tritonclient needs protobuf < 7, the main venv has 7):
``triton_probe.py GRPC_ADDRESS MODEL CHECK`` with CHECK one of ``metadata``, ``infer``,
``malformed``, ``deadlines``.
"""
from __future__ import annotations

import json
import sys
import threading
from typing import Any

import cv2
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def image(fmt: str) -> bytes:
    """Return a 640x480 noise image encoded as ``fmt`` ('.jpg' or '.png')."""
    rgb = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    return cv2.imencode(fmt, rgb)[1].tobytes()


def image_input(data: bytes) -> grpcclient.InferInput:
    """Return the IMAGE tensor of one request: shape [1, 1], BYTES."""
    tensor = grpcclient.InferInput('IMAGE', [1, 1], 'BYTES')
    tensor.set_data_from_numpy(np.array([[data]], dtype=object))
    return tensor


def outputs(result: grpcclient.InferResult) -> dict[str, Any]:
    """Return the shapes and a sample of an answer's tensors."""
    labels = result.as_numpy('LABELS')
    return {'boxes': list(result.as_numpy('BOXES').shape),
            'scores': list(result.as_numpy('SCORES').shape), 'labels': list(labels.shape),
            'label_names': sorted({x.decode() for x in labels.reshape(-1)}),
            'box_max': float(result.as_numpy('BOXES').max(initial=0.0))}


def burst(client: grpcclient.InferenceServerClient, model: str, payloads: list[bytes],
          timeout_us: int | None) -> list[dict[str, Any]]:
    """Send all payloads at once (asynchronously); return each answer or error, in order."""
    answers: list[dict[str, Any]] = [{} for _ in payloads]
    done = threading.Semaphore(0)

    def record(index: int, result: grpcclient.InferResult | None,
               error: InferenceServerException | None) -> None:
        answers[index] = ({'ok': outputs(result)} if error is None else
                          {'status': error.status(), 'message': error.message()})
        done.release()

    for index, data in enumerate(payloads):
        client.async_infer(model, [image_input(data)], timeout=timeout_us,
                           callback=lambda result, error, i=index: record(i, result, error))
    for _ in payloads:
        if not done.acquire(timeout=60):
            raise TimeoutError('an answer did not come within 60 s')
    return answers


def main() -> None:
    """Run one check and print its findings."""
    address, model, check = sys.argv[1:4]
    client = grpcclient.InferenceServerClient(address)
    found: dict[str, Any]
    if check == 'metadata':
        metadata = client.get_model_metadata(model, as_json=True)
        config = client.get_model_config(model, as_json=True)['config']
        found = {'server_ready': client.is_server_ready(),
                 'model_ready': client.is_model_ready(model),
                 'inputs': metadata['inputs'], 'outputs': metadata['outputs'],
                 'max_batch_size': config['max_batch_size'],
                 'dynamic_batching': config['dynamic_batching']}
    elif check == 'infer':
        found = {fmt: outputs(client.infer(model, [image_input(image(fmt))]))
                 for fmt in ('.jpg', '.png')}
    elif check == 'malformed':
        good = image('.jpg')
        found = {'answers': burst(client, model, [good, b'not an image', good, good[:200], good],
                                  None)}
    elif check == 'deadlines':
        found = {'answers': burst(client, model, [image('.jpg')] * 16, 50_000)}
    else:
        raise SystemExit(f'unknown check {check!r}')
    print(json.dumps(found))


if __name__ == '__main__':
    main()
