"""The repository of NVIDIA's python_backend `examples/`, as a Triton user would deploy them.

One folder per example model, with the example's model name, config and behaviour:

  add_sub              OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (FP32 [4])
  pytorch              the same computed by a torch.nn.Module inside model.py
  bls_sync             BLS `exec()` to the model named by the MODEL_NAME string input
  bls_async            `async def execute`: add_sub and pytorch at once with `async_exec()`
  square_int32         decoupled: IN = n sends n responses OUT = n, then the final flag
  repeat_int32         decoupled: one response per element of IN from a thread, DELAY ms apart,
                       while execute returns after WAIT ms
  bls_decoupled_sync   BLS `exec(decoupled=True)` to square_int32, SUM of the answers
  bls_decoupled_async  two `async_exec(decoupled=True)` to square_int32 at once, SUM of both
  custom_metrics       add_sub that counts its latency in a `MetricFamily` counter
  error_source         answers with a TritonError of the code it is given (bls_error_code)
  bls_error_caller     calls error_source by BLS and reports the code and message it got
  nobatch_auto_complete, batch_auto_complete
                       configs that only name the model: `auto_complete_config` fills them
  instance_kind        reports `model_instance_kind`/`model_instance_device_id`/instance name

Examples not here need what this machine lacks: `preprocessing`, `resnet50_trt` (TensorRT,
torchvision), `jax`, `huggingface_t5_translation` (downloads), `instance_kind` with a resnet
(torchvision weights); the instance kind part is kept.
"""

from __future__ import annotations

from pathlib import Path

ADD_SUB_CONFIG = """name: "{name}"
backend: "python"
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
input [ {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU }} ]
"""

ADD_SUB = '''
import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.dtypes = [pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
                       for name in ("OUTPUT0", "OUTPUT1")]

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", (a + b).astype(self.dtypes[0])),
                pb_utils.Tensor("OUTPUT1", (a - b).astype(self.dtypes[1])),
            ]))
        return responses

    def finalize(self):
        print("add_sub: finalize")
'''

PYTORCH = '''
import torch
import triton_python_backend_utils as pb_utils


class SumAndDifference(torch.nn.Module):
    def forward(self, a, b):
        return a + b, a - b


class TritonPythonModel:
    def initialize(self, args):
        self.net = SumAndDifference().eval()

    def execute(self, requests):
        responses = []
        for request in requests:
            a = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy().copy())
            b = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy().copy())
            with torch.no_grad():
                total, difference = self.net(a, b)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", total.numpy()),
                pb_utils.Tensor("OUTPUT1", difference.numpy()),
            ]))
        return responses
'''

BLS_SYNC_CONFIG = """name: "bls_sync"
backend: "python"
input [
  { name: "MODEL_NAME" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
instance_group [ { kind: KIND_CPU } ]
"""

# As the published example: the model name is the raw element of the BYTES input (bytes, not str).
BLS_SYNC = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            target = pb_utils.get_input_tensor_by_name(request, "MODEL_NAME").as_numpy()[0]
            bls = pb_utils.InferenceRequest(
                model_name=target,
                requested_output_names=["OUTPUT0", "OUTPUT1"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "INPUT0"),
                        pb_utils.get_input_tensor_by_name(request, "INPUT1")],
            )
            answer = bls.exec()
            if answer.has_error():
                raise pb_utils.TritonModelException(answer.error().message())
            responses.append(pb_utils.InferenceResponse(output_tensors=answer.output_tensors()))
        return responses
'''

BLS_ASYNC_CONFIG = ADD_SUB_CONFIG.format(name="bls_async")

BLS_ASYNC = '''
import asyncio

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            inputs = [pb_utils.get_input_tensor_by_name(request, "INPUT0"),
                      pb_utils.get_input_tensor_by_name(request, "INPUT1")]
            pending = [
                pb_utils.InferenceRequest(model_name=name, requested_output_names=["OUTPUT0", "OUTPUT1"],
                                          inputs=inputs).async_exec()
                for name in ("add_sub", "pytorch")
            ]
            first, second = await asyncio.gather(*pending)
            for answer in (first, second):
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
            responses.append(pb_utils.InferenceResponse([
                pb_utils.get_output_tensor_by_name(first, "OUTPUT0"),
                pb_utils.get_output_tensor_by_name(second, "OUTPUT1"),
            ]))
        return responses
'''

SQUARE_CONFIG = """name: "square_int32"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: True }
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""

SQUARE = '''
import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("square_int32 needs model_transaction_policy { decoupled: true }")
        self.threads = []

    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            thread = threading.Thread(target=self.answer, args=(request.get_response_sender(), n), daemon=True)
            self.threads.append(thread)
            thread.start()
        return None

    def answer(self, sender, n):
        for _ in range(n):
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([n], dtype=np.int32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join()
'''

REPEAT_CONFIG = """name: "repeat_int32"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: True }
input [
  { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "DELAY" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "WAIT" data_type: TYPE_UINT32 dims: [ 1 ] }
]
output [
  { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] }
]
"""

REPEAT = '''
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.threads = []

    def execute(self, requests):
        if len(requests) != 1:
            raise pb_utils.TritonModelException(f"unsupported batch size {len(requests)}")
        request = requests[0]
        values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().copy()
        delays = pb_utils.get_input_tensor_by_name(request, "DELAY").as_numpy().copy()
        wait_ms = int(pb_utils.get_input_tensor_by_name(request, "WAIT").as_numpy()[0])
        thread = threading.Thread(target=self.answer, args=(request.get_response_sender(), values, delays),
                                  daemon=True)
        self.threads.append(thread)
        thread.start()
        time.sleep(wait_ms / 1000)
        return None

    def answer(self, sender, values, delays):
        for idx, value in enumerate(values):
            time.sleep(int(delays[idx % len(delays)]) / 1000)
            sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor("IDX", np.array([idx], dtype=np.uint32)),
                pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
            ]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join()
'''

BLS_DECOUPLED_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "IN" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "SUM" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU }} ]
"""

BLS_DECOUPLED_SYNC = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        if len(requests) != 1:
            raise pb_utils.TritonModelException(f"unsupported batch size {len(requests)}")
        n = pb_utils.get_input_tensor_by_name(requests[0], "IN")
        total = np.zeros(1, dtype=np.int32)
        bls = pb_utils.InferenceRequest(model_name="square_int32", inputs=[n], requested_output_names=["OUT"])
        for answer in bls.exec(decoupled=True):
            if answer.has_error():
                raise pb_utils.TritonModelException(answer.error().message())
            out = pb_utils.get_output_tensor_by_name(answer, "OUT")
            if out is not None:  # the last answer may be the empty final one
                total += out.as_numpy()
        return [pb_utils.InferenceResponse([pb_utils.Tensor("SUM", total)])]
'''

BLS_DECOUPLED_ASYNC = '''
import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        if len(requests) != 1:
            raise pb_utils.TritonModelException(f"unsupported batch size {len(requests)}")
        n = pb_utils.get_input_tensor_by_name(requests[0], "IN")
        streams = await asyncio.gather(*[
            pb_utils.InferenceRequest(model_name="square_int32", inputs=[n],
                                      requested_output_names=["OUT"]).async_exec(decoupled=True)
            for _ in range(2)
        ])
        total = np.zeros(1, dtype=np.int32)
        for answers in streams:
            for answer in answers:
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
                out = pb_utils.get_output_tensor_by_name(answer, "OUT")
                if out is not None:
                    total += out.as_numpy()
        return [pb_utils.InferenceResponse([pb_utils.Tensor("SUM", total)])]
'''

CUSTOM_METRICS = '''
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # Kept, as the published example keeps it: a family goes when its last reference does.
        self.family = pb_utils.MetricFamily(
            name="requests_process_latency_ns",
            description="Cumulative time spent processing requests",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.latency = self.family.Metric(labels={"model": "custom_metrics", "version": "1"})

    def execute(self, requests):
        started = time.time_ns()
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", a + b),
                                                         pb_utils.Tensor("OUTPUT1", a - b)]))
        self.latency.increment(time.time_ns() - started)
        pb_utils.Logger.log_info(f"cumulative latency {self.latency.value()}")
        return responses
'''

ERROR_SOURCE_CONFIG = """name: "error_source"
backend: "python"
max_batch_size: 0
input [ { name: "ERROR_CODE" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""

ERROR_SOURCE = '''
import triton_python_backend_utils as pb_utils

CODES = {
    0: pb_utils.TritonError.UNKNOWN, 1: pb_utils.TritonError.INTERNAL, 2: pb_utils.TritonError.NOT_FOUND,
    3: pb_utils.TritonError.INVALID_ARG, 4: pb_utils.TritonError.UNAVAILABLE, 5: pb_utils.TritonError.UNSUPPORTED,
    6: pb_utils.TritonError.ALREADY_EXISTS, 7: pb_utils.TritonError.CANCELLED,
}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            code = pb_utils.get_input_tensor_by_name(request, "ERROR_CODE").as_numpy()[0]
            error = pb_utils.TritonError(f"Test error with code {code}", CODES.get(code, pb_utils.TritonError.INTERNAL))
            responses.append(pb_utils.InferenceResponse(error=error))
        return responses
'''

BLS_ERROR_CALLER_CONFIG = """name: "bls_error_caller"
backend: "python"
max_batch_size: 0
input [ { name: "ERROR_CODE" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [
  { name: "RECEIVED_CODE" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "ERROR_MESSAGE" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU } ]
"""

BLS_ERROR_CALLER = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            code = pb_utils.get_input_tensor_by_name(request, "ERROR_CODE").as_numpy()
            answer = pb_utils.InferenceRequest(model_name="error_source", requested_output_names=["OUTPUT"],
                                               inputs=[pb_utils.Tensor("ERROR_CODE", code)]).exec()
            if answer.has_error():
                received, message = int(answer.error().code()), str(answer.error().message())
            else:
                received, message = -1, "no error"
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("RECEIVED_CODE", np.array([received], dtype=np.int32)),
                pb_utils.Tensor("ERROR_MESSAGE", np.array([message], dtype=object)),
            ]))
        return responses
'''

# auto_complete: the config names the model and its backend only; the model fills in the rest.
AUTO_COMPLETE = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        inputs = [{{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}},
                  {{"name": "INPUT1", "data_type": "TYPE_FP32", "dims": [4]}}]
        outputs = [{{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}},
                   {{"name": "OUTPUT1", "data_type": "TYPE_FP32", "dims": [4]}}]
        config = auto_complete_model_config.as_dict()
        have_in = {{i["name"] for i in config["input"]}}
        have_out = {{o["name"] for o in config["output"]}}
        for entry in inputs:
            if entry["name"] not in have_in:
                auto_complete_model_config.add_input(entry)
        for entry in outputs:
            if entry["name"] not in have_out:
                auto_complete_model_config.add_output(entry)
        auto_complete_model_config.set_max_batch_size({max_batch_size})
        {dynamic_batching}
        return auto_complete_model_config

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", a + b),
                                                         pb_utils.Tensor("OUTPUT1", a - b)]))
        return responses
'''

INSTANCE_KIND_CONFIG = """name: "instance_kind"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "KIND" data_type: TYPE_STRING dims: [ 3 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { }
"""

INSTANCE_KIND = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.facts = [args["model_instance_kind"], args["model_instance_device_id"], args["model_instance_name"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy().shape[0]
            facts = np.array([[f.encode() for f in self.facts]] * rows, dtype=object)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("KIND", facts)]))
        return responses
'''


def _model(repo: Path, name: str, config: str | None, source: str) -> None:
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.pbtxt").write_text(config, encoding="utf-8")
    (folder / "1" / "model.py").write_text(source.lstrip(), encoding="utf-8")


def build_python_examples(repo: Path) -> Path:
    """Write every model above into `repo` and return it."""
    _model(repo, "add_sub", ADD_SUB_CONFIG.format(name="add_sub"), ADD_SUB)
    _model(repo, "pytorch", ADD_SUB_CONFIG.format(name="pytorch"), PYTORCH)
    _model(repo, "bls_sync", BLS_SYNC_CONFIG, BLS_SYNC)
    _model(repo, "bls_async", BLS_ASYNC_CONFIG, BLS_ASYNC)
    _model(repo, "square_int32", SQUARE_CONFIG, SQUARE)
    _model(repo, "repeat_int32", REPEAT_CONFIG, REPEAT)
    _model(repo, "bls_decoupled_sync", BLS_DECOUPLED_CONFIG.format(name="bls_decoupled_sync"), BLS_DECOUPLED_SYNC)
    _model(repo, "bls_decoupled_async", BLS_DECOUPLED_CONFIG.format(name="bls_decoupled_async"), BLS_DECOUPLED_ASYNC)
    _model(repo, "custom_metrics", ADD_SUB_CONFIG.format(name="custom_metrics"), CUSTOM_METRICS)
    _model(repo, "error_source", ERROR_SOURCE_CONFIG, ERROR_SOURCE)
    _model(repo, "bls_error_caller", BLS_ERROR_CALLER_CONFIG, BLS_ERROR_CALLER)
    _model(repo, "nobatch_auto_complete", 'name: "nobatch_auto_complete"\nbackend: "python"\n',
           AUTO_COMPLETE.format(max_batch_size=0, dynamic_batching="pass"))
    _model(repo, "batch_auto_complete", 'name: "batch_auto_complete"\nbackend: "python"\n',
           AUTO_COMPLETE.format(max_batch_size=4, dynamic_batching="auto_complete_model_config.set_dynamic_batching()"))
    _model(repo, "instance_kind", INSTANCE_KIND_CONFIG, INSTANCE_KIND)
    return repo
