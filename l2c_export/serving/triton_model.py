"""The Triton Python model of an l2c-export build (copied into a repository as ``NAME/1/model.py``).

It runs the whole denoising loop in-process with the build's backend, on the build beside it (``1/build``, its
sha256s checked when the model loads), so the cache never leaves the process and each sampling batch has its own.
The requests that Triton's dynamic batcher hands over together are sampled as one batch per guidance scale
(``l2c_export.serving.sampling``); a bad request gets its own error and the others in the batch go on.

Inputs and outputs, per image (the batch dimension is images): the build's conditioning (``labels`` INT64 [1]; for
a build with a text encoder ``prompt`` BYTES [1] and optional ``negative_prompt`` BYTES [1]; for another text model
each conditioning array by its pipeline argument name, token embeddings FP32 [L, D], a token mask FP32 [L], and when
guiding their ``negative`` partners), read from the manifest (``l2c_export.serving.sampling.served_inputs``); optional ``noise`` FP32 [C, H, W], ``seed`` INT64
[1], ``cfg_scale`` FP32 [1]; ``samples`` FP32 [C, H, W] (pixels in [-1, 1] or latents, as ``L2CPipeline`` returns
them) and, for pixel models and builds with a VAE decoder, ``images`` UINT8 [H, W, 3].

Metrics beside Triton's own: ``l2c_sampling_batches_total`` and ``l2c_sampled_images_total`` (their ratio is the
mean sampling batch), labelled by model and version.

Runs in the server's Python environment (numpy < 2 for the stub), which needs l2c-export and the build's backend
installed; the onnxruntime path imports no PyTorch.
"""

import json
import os
import sys
from pathlib import Path

# The stub's embedded interpreter ignores PYTHONDONTWRITEBYTECODE; without this, importing l2c_export below would
# write .pyc files beside its sources, outside the model repository.
sys.dont_write_bytecode = True

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from l2c_export.core.images import to_uint8  # noqa: E402
from l2c_export.runtime.pipeline import L2CPipeline  # noqa: E402
from l2c_export.serving.sampling import decode_request, sample_requests, served_inputs  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        backend = parameters.get("backend", "onnxruntime")
        options = {}
        on_gpu = args["model_instance_kind"] == "GPU"
        device = int(args["model_instance_device_id"])
        if backend == "onnxruntime":
            options["providers"] = ([("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
                                    if on_gpu else ["CPUExecutionProvider"])
            if int(parameters.get("threads", "0")) > 0:
                options["threads"] = int(parameters["threads"])
        elif on_gpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(device)  # this stub process's only device, set before CUDA loads
        build = Path(__file__).resolve().parent / "build"
        self.pipeline = L2CPipeline.from_engine_dir(build, backend=backend, verify=True, **options)
        self.pixel_space = self.pipeline.manifest["model"]["space"] == "pixel"
        self.decoder = self.pipeline.decoder  # a latent build's VAE decoder graph, or None
        self.input_names = [name for name, *_ in served_inputs(self.pipeline.manifest)]
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.batches_family = pb_utils.MetricFamily(name="l2c_sampling_batches_total",
                                                    description="Sampling batches run (one L2CPipeline call each)",
                                                    kind=pb_utils.MetricFamily.COUNTER)
        self.images_family = pb_utils.MetricFamily(name="l2c_sampled_images_total",
                                                   description="Images sampled", kind=pb_utils.MetricFamily.COUNTER)
        self.batches = self.batches_family.Metric(labels=labels)
        self.images = self.images_family.Metric(labels=labels)

    def execute(self, requests):
        decoded, errors = [], {}
        for index, request in enumerate(requests):
            tensors = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                tensors[name] = None if tensor is None else tensor.as_numpy()
            try:
                decoded.append((index, decode_request(self.pipeline, **tensors)))
            except ValueError as error:
                errors[index] = pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
        results, batch_sizes = sample_requests(self.pipeline, [request for _, request in decoded])
        for size in batch_sizes:
            self.batches.increment(1)
            self.images.increment(size)
        responses = {}
        for (index, _), samples in zip(decoded, results):
            if isinstance(samples, Exception):
                responses[index] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"sampling failed: {type(samples).__name__}: {samples}"))
                continue
            outputs = [pb_utils.Tensor("samples", np.ascontiguousarray(samples, dtype=np.float32))]
            if self.pixel_space or self.decoder is not None:
                try:
                    pictures = to_uint8(samples if self.pixel_space else self.decoder(samples))  # (n, (F,) H, W, C)
                except Exception as error:  # noqa: BLE001 - this request's error; the others go on
                    responses[index] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"decoding failed: {type(error).__name__}: {error}"))
                    continue
                if pictures.shape[-1] == 1:
                    pictures = np.repeat(pictures, 3, axis=-1)
                # images (n, H, W, 3), or a video model's frames (n, F, H, W, 3)
                outputs.append(pb_utils.Tensor("frames" if pictures.ndim == 5 else "images",
                                               np.ascontiguousarray(pictures)))
            responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)
        for index, error in errors.items():
            responses[index] = pb_utils.InferenceResponse(error=error)
        return [responses[index] for index in range(len(requests))]
