"""text_features: text -> 64 hashed character-trigram features (the `mlp` model's input).

A Triton python-backend model, unchanged from how it would run under Triton: it only
uses `triton_python_backend_utils`. Invalid UTF-8 fails that request alone, through an
error response, while the other requests of the batch get their features.
"""

import json
import zlib

import numpy as np
import triton_python_backend_utils as pb_utils

WIDTH = 64


def features(text: str) -> np.ndarray:
    """Counts of crc32(trigram) % WIDTH over the padded lower-case text, L2-normalised."""
    padded = f"  {text.lower()} "
    out = np.zeros(WIDTH, dtype=np.float32)
    for i in range(len(padded) - 2):
        out[zlib.crc32(padded[i:i + 3].encode("utf-8")) % WIDTH] += 1.0
    norm = float(np.linalg.norm(out))
    return out / norm if norm else out


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        output = pb_utils.get_output_config_by_name(config, "FEATURES")
        self.dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        if output["dims"] != [WIDTH]:
            raise pb_utils.TritonModelException(f"FEATURES must have dims [{WIDTH}], got {output['dims']}")

    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            try:
                rows = [features(t.decode("utf-8") if isinstance(t, bytes) else str(t)) for t in texts]
            except UnicodeDecodeError as exc:
                error = pb_utils.TritonError(f"TEXT must be UTF-8: {exc}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            out = np.stack(rows).astype(self.dtype) if rows else np.zeros((0, WIDTH), self.dtype)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("FEATURES", out)]))
        return responses
