"""``l2c-export build``: model + schedule -> subset graphs, engines and ``manifest.json`` in one folder.

What a build folder guarantees:

- Nothing lost: ``--out`` must be absent, empty, or a previous l2c-export build (a valid manifest and nothing but the
  files it names); anything else is refused before anything is written.
- Atomic: everything is written into a hidden staging folder beside the output, the manifest last, and the staging
  folder then takes the output's place in one atomic exchange of the two names (``renameat2(RENAME_EXCHANGE)``), so
  ``--out`` always holds a complete build, the previous one or the new one. Where the file system cannot exchange,
  two renames are used, and a build killed between them is put back by the next build before anything else.
- Locked: builds into one ``--out`` hold an exclusive lock beside it (``.<name>.lock``, removed when the build
  ends, whatever its outcome), so a second build waits for the first instead of sharing its staging folder.
- Closed world: a previous build's files are reused only through :func:`manifest.file_path` (inside the folder, no
  links), and only when their sha256 still matches.

Incremental: every file carries a key, a hash of what produced it (weights, config, precision, subset, tool
versions, and the exporter's own source: :func:`l2c_export.builder.reuse.exporter_digest`). A rebuild reuses a
previous file with the same key (hard link) instead of tracing, exporting or building again; when every file is
reusable the model is not even loaded.

The folder transaction lives by job beside this module: :mod:`.output_folder` (what ``--out`` may be, recovery of a
killed build), :mod:`.lock` (the lock) and :mod:`.reuse` (keys and reuse).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..core import manifest as manifest_io
from ..core.backends import precision_refusal
from ..core.plan import BuildPlan, SubsetPlan, cache_input_name, fresh_output_name
from ..core.schedule import Schedule
from ..core.util import replace_folder
from ..models.zoo import ModelSpec
from ..samplers import DenoisingSampler
from .components import check_components, require_exporters
from .engines import BatchRange, get_builder
from .lock import exclusive_lock
from .memory import check_build_fits
from .output_folder import check_output_folder, recover
from .reuse import exporter_digest, key_of, previous_files, reuse, tool_versions


@dataclass
class BuildRequest:
    spec: ModelSpec
    schedule: Schedule
    sampler: DenoisingSampler
    out_dir: Path
    backend: str = "onnxruntime"
    precision: str = "fp32"
    batch: BatchRange = field(default_factory=lambda: BatchRange(1, 2, 16))
    cfg_scale: float | None = None
    guide_all_channels: bool = False
    quantization: str | None = None  # int8: "dynamic" or "qdq" (default: l2c_export.export.quantize.default_form)
    calibration_images: int = 4  # qdq: images whose full-model trajectories calibrate the activation scales


@dataclass
class BuildReport:
    manifest_path: Path
    exported: list[str]  # subset graphs exported in this build
    reused: list[str]  # files reused from the previous build
    traced: bool
    subsets: int = 0  # subset graphs in the build (every expert's)


def build(request: BuildRequest, progress: bool = True) -> BuildReport:
    from ..export.onnx import PRECISIONS

    if request.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {request.precision!r}")
    refusal = precision_refusal(request.backend, request.precision)
    if refusal:
        raise ValueError(f"--precision {request.precision} --backend {request.backend}: {refusal}")
    _quantization_form(request)
    out_dir = Path(request.out_dir)
    staging = out_dir.parent / f".{out_dir.name}.staging"
    builder = get_builder(request.backend, staging)
    builder.check_available()  # before anything is written
    spec = request.spec
    require_exporters(spec)
    request.schedule.check_fits(request.sampler.num_calls, spec.sublayer_names)
    plan = _plan(request)
    check_components(spec)  # the tokenizer as it will be exported: a bad one is refused before the first export
    check_build_fits(spec)  # the memory estimate, before torch allocates anything
    check_output_folder(out_dir)
    with exclusive_lock(out_dir, progress):
        recover(out_dir)
        check_output_folder(out_dir)  # again, under the lock: another build may have written it meanwhile
        return _build_locked(request, builder, plan, out_dir, staging, progress)


def _plan(request: BuildRequest) -> BuildPlan:
    """The schedule's subsets; a pipeline of experts' (Wan2.2's) each expert's own, the first step of each checked to
    compute everything, before anything is written."""
    spec = request.spec
    if spec.experts is None:
        return BuildPlan.from_schedule(request.schedule)
    if request.precision in ("int8", "fp8"):
        raise ValueError(f"--precision {request.precision}: a pipeline of {len(spec.experts.models)} experts "
                         f"({', '.join(m.name for m in spec.experts.models)}) is built in float precisions only")
    step_expert = spec.experts.step_expert(request.sampler)
    request.schedule.check_expert_starts(step_expert, [m.name for m in spec.experts.models])
    return BuildPlan.from_schedule(request.schedule, step_expert, tuple(m.prefix for m in spec.experts.models))


def _expert_configs(spec: ModelSpec) -> list:
    """Each expert's config (the one transformer's where the pipeline has no experts)."""
    return [spec.config] if spec.experts is None else [m.config for m in spec.experts.models]


def _build_locked(request: BuildRequest, builder, plan: BuildPlan, out_dir: Path, staging: Path,
                  progress: bool) -> BuildReport:
    from ..export.onnx import NUMPY_DTYPES, OPSET

    spec, config = request.spec, request.spec.config
    form = _quantization_form(request)
    versions = tool_versions()
    weights_sha = spec.family.weights_sha256(spec.weights)
    experts = None if spec.experts is None else [
        {"name": m.name, "prefix": m.prefix, "config": m.config.to_dict(),
         "weights_sha256": weights_sha if i == 0 else spec.family.weights_sha256(m.weights)}
        for i, m in enumerate(spec.experts.models)]
    base_key = key_of({"weights": weights_sha, "family": spec.family.name, "config": config.to_dict(),
                       "precision": request.precision, "opset": OPSET, "versions": versions,
                       "exporter": exporter_digest(), "quantization": form,
                       "calibration": request.calibration_images if form == "qdq" else None,
                       **({"reduce_range": request.backend == "onnxruntime"} if form is not None else {}),
                       **({"experts": experts} if experts is not None else {})})
    graph_keys = [key_of({"base": base_key, "compute": s.compute, "writes": s.writes,
                          **({"expert": s.expert} if experts is not None else {})}) for s in plan.subsets]
    previous = previous_files(out_dir)

    if staging.exists():
        shutil.rmtree(staging)  # left by a build that was killed
    staging.mkdir(parents=True)
    reused: list[str] = []
    exported: list[str] = []
    try:
        universals = None
        quantization = None
        weights_name = "weights.bin"
        graph_files = [f"{subset.name}.onnx" for subset in plan.subsets]
        need_trace = not reuse(previous, base_key, staging / weights_name, reused) or not all(
            key in previous for key in graph_keys)
        if need_trace:
            from ..export.onnx import trace, weights_layout, write_weights

            if spec.experts is None:
                model = spec.load_model()
                universals = [trace(model, request.precision, spec.family)]
                if form is not None:
                    quantization = _quantize(universals[0], form, model, request)
            else:  # each expert traced, its weights and slots named with its prefix
                universals = [trace(spec.family.load(m.weights, m.config), request.precision,
                                    spec.family).with_prefix(m.prefix) for m in spec.experts.models]
            reusing_weights = weights_name in reused
            layout = (weights_layout(*universals) if reusing_weights
                      else write_weights(universals[0], staging / weights_name, *universals[1:]))
            for universal in universals:
                universal.bind_weights(layout)
        dtype = NUMPY_DTYPES[request.precision]
        subset_records = []
        bar = tqdm(list(zip(plan.subsets, graph_files, graph_keys)), desc=f"building {request.backend} subsets",
                   disable=not progress)
        for subset, graph_file, key in bar:
            bar.set_postfix_str(subset.name)
            inputs, outputs = _interface(subset, plan, spec, dtype)
            if not reuse(previous, key, staging / graph_file, reused):
                _export_subset(universals[subset.expert], subset, staging / graph_file, inputs, outputs,
                               _stamped_fields(spec, subset.expert), form)
                exported.append(graph_file)
            engine_file = builder.engine_file(graph_file, key)
            # a text model's engine profile spans its prompt lengths (build --max-sequence-length)
            prompt_tokens = {} if spec.max_prompt_tokens is None else {"prompt_tokens": spec.max_prompt_tokens}
            engine_key = key_of({"graph": key, "backend": request.backend, "batch": request.batch.to_dict(),
                                 **prompt_tokens})
            if engine_file != graph_file and not reuse(previous, engine_key, staging / engine_file, reused):
                builder.build(staging / graph_file, staging / engine_file, inputs, request.batch,
                              spec.family.dim_ranges(spec.config, spec.max_prompt_tokens))
            subset_records.append(_subset_record(subset, plan, staging, graph_file, key, engine_file,
                                                 engine_key, inputs, outputs, spec))
        data = _manifest(request, plan, subset_records, staging, weights_name, base_key, weights_sha, dtype, versions)
        if experts is not None:
            data["experts"] = _experts_record(request, plan, experts)
        components = _components(spec, staging, out_dir, previous, reused, versions)
        if components:
            data["components"] = components
        data["weight_tensors"] = _weight_table(universals, out_dir, quantization)
        if form is not None:
            data["quantization"] = _quantization_record(quantization, out_dir)
        manifest_io.write(staging, data)
        replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildReport(out_dir / manifest_io.MANIFEST_NAME, exported, reused, universals is not None,
                       len(plan.subsets))


def _components(spec: ModelSpec, staging: Path, out_dir: Path, previous: dict[str, Path], reused: list[str],
                versions: dict) -> dict:
    """The manifest's ``components`` (:mod:`.components`): the diffusers folder's VAE decoder, text encoder and
    tokenizer, each reused from the previous build when its source and the tools are unchanged."""
    from ..export.onnx import OPSET
    from .components import build_components

    try:
        before = manifest_io.load(out_dir, verify_files=False).get("components", {})
    except manifest_io.ManifestError:
        before = {}
    exporters = tool_versions(("diffusers", "transformers", "tokenizers"))  # they make the components' files
    return build_components(
        spec, staging, key_of=lambda file, source: key_of({"file": file, "source": source, "opset": OPSET,
                                                           "versions": versions, "exporters": exporters,
                                                           "exporter": exporter_digest()}),
        reuse=lambda key, target: reuse(previous, key, target, reused), previous_record=before.get)


# ---------------------------------------------------------------------------------------------------------------------
def _interface(subset: SubsetPlan, plan: BuildPlan, spec: ModelSpec, dtype: str) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs as manifest tensor records: the family's model inputs and output, then the
    cache inputs and fresh outputs of the subset's live slots (its expert's: :meth:`BuildPlan.slot_name`)."""
    family, config = spec.family, spec.config
    shapes = [["batch", *shape] for shape in family.cached_shapes(config)]
    slots = [plan.slot_name(subset, k) for k in range(len(plan.slots))]
    inputs = [tensor.record() for tensor in family.graph_inputs(config)] + [
        {"name": cache_input_name(slots[k]), "dtype": dtype, "shape": shapes[k], "slot": slots[k],
         "role": "cache"} for k in subset.reads]
    outputs = [family.graph_output(config).record()] + [
        {"name": fresh_output_name(slots[k]), "dtype": dtype, "shape": shapes[k], "slot": slots[k],
         "role": "fresh"} for k in subset.writes]
    return inputs, outputs


def _quantization_form(request: BuildRequest) -> str | None:
    """The quantized form of an int8/fp8 build (None for a float one), its options checked."""
    from ..export.quantize import QUANTIZED_PRECISIONS, default_form

    if request.precision not in QUANTIZED_PRECISIONS:
        if request.quantization is not None:
            raise ValueError(f"--quantization applies to --precision {', '.join(QUANTIZED_PRECISIONS)} only; "
                             f"got --precision {request.precision}")
        return None
    form = request.quantization or default_form(request.backend, request.precision)
    if (request.backend == "tensorrt" or request.precision == "fp8") and form != "qdq":
        raise ValueError(f"--quantization {form}: TensorRT and fp8 take quantized graphs only in explicit Q/DQ "
                         f"form; use qdq")
    if not 1 <= request.calibration_images <= 1024:
        raise ValueError(f"--calibration-images must be in 1..1024; got {request.calibration_images}")
    return form


def _quantize(universal, form: str, model, request: BuildRequest) -> dict:
    from ..export.quantize import calibration_batches, quantize_universal

    calibration = None
    if form == "qdq":
        cfg_scale = float(request.spec.cfg_scale if request.cfg_scale is None else request.cfg_scale)
        calibration = calibration_batches(model, request.sampler, cfg_scale,
                                          request.spec.family.null_class(model.config),
                                          images=request.calibration_images)
    return quantize_universal(universal, form, calibration, request.precision,
                              reduce_range=request.backend == "onnxruntime")


def _export_subset(universal, subset: SubsetPlan, path: Path, inputs: list[dict], outputs: list[dict],
                   stamped: dict, form: str | None = None) -> None:
    """Writes subset ``subset``'s graph to ``path``, stamped with the manifest fields it fixes (``stamped``, see
    :data:`l2c_export.core.manifest.GRAPH_STAMP_KEY`)."""
    import onnx

    from ..export.onnx import check_ops_supported, subset_graph
    from ..export.opsupport import tensorrt_supported_ops

    graph = subset_graph(universal, subset, graph_name=subset.name)
    supported = set(tensorrt_supported_ops())
    if form == "dynamic":  # ONNX Runtime's dynamic int8 form; TensorRT builds take the qdq form instead
        supported |= {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    check_ops_supported(graph, supported, where=path.name)
    got = ([i.name for i in graph.graph.input], [o.name for o in graph.graph.output])
    want = ([t["name"] for t in inputs], [t["name"] for t in outputs])
    if got != want:  # the surgery and the liveness plan must agree exactly
        raise AssertionError(f"{path.name}: graph interface {got} differs from the plan's {want}")
    _check_structure(graph)
    onnx.helper.set_model_props(graph, {manifest_io.GRAPH_STAMP_KEY: manifest_io.graph_stamp(stamped)})
    onnx.save_model(graph, str(path))


def _check_structure(graph) -> None:
    """onnx.checker with full shape inference on the graph, its external weights stood in for by typed inputs.

    The checker also opens external data, and refuses a file with several hard links, which weights.bin is during an
    incremental build (linked to the previous build's until that is removed). Its bytes are covered by sha256.
    """
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    external = [t for t in probe.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        probe.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    kept = [t for t in probe.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    onnx.checker.check_model(probe, full_check=True)


def _subset_record(subset, plan, folder, graph_file, graph_key, engine_file, engine_key, inputs, outputs,
                   spec) -> dict:
    macs = spec.family.count_macs(_expert_configs(spec)[subset.expert])
    graph_entry = manifest_io.file_entry(folder, graph_file, graph_key)
    engine_entry = graph_entry if engine_file == graph_file else manifest_io.file_entry(folder, engine_file,
                                                                                        engine_key)
    reads = [plan.slot_name(subset, k) for k in subset.reads]
    writes = [plan.slot_name(subset, k) for k in subset.writes]
    return {"index": subset.index, "name": subset.name, "compute": [int(v) for v in subset.compute],
            "steps": list(subset.steps), "reads": reads, "writes": writes, "graph": graph_entry,
            "engine": engine_entry, "inputs": inputs, "outputs": outputs,
            "macs_per_sample": macs.of_subset(subset.compute),
            **({"expert": subset.expert} if spec.experts is not None else {})}


def _stamped_fields(spec: ModelSpec, expert: int = 0) -> dict:
    """The manifest fields the graphs fix, by path (:data:`l2c_export.core.manifest.STAMPED_FIELDS`): written into the
    manifest and stamped into every graph from this one place. A model without labels has no null class: the stamp
    says null, and the manifest has no such field. A later expert's graphs (``expert``) fix its config too."""
    stamped = {"model/config": spec.config.to_dict(), "guidance/null_class": spec.family.null_class(spec.config)}
    if expert:
        stamped[f"experts/models/{expert}/config"] = spec.experts.models[expert].config.to_dict()
    return stamped


def _experts_record(request: BuildRequest, plan: BuildPlan, experts: list[dict]) -> dict:
    """The manifest's ``experts``: the boundary, the expert of each call, and each expert's name, prefix, guidance
    scale argument, config and weights digest (``experts``: all but the scale argument)."""
    spec_experts = request.spec.experts
    return {"boundary_ratio": spec_experts.boundary_ratio,
            "boundary_timestep": spec_experts.boundary_timestep(request.sampler),
            "step_expert": list(plan.step_expert),
            "models": [{**{key: record[key] for key in ("name", "prefix")}, "scale_argument": m.scale_argument,
                        **{key: record[key] for key in ("config", "weights_sha256")}}
                       for record, m in zip(experts, spec_experts.models)]}


def _manifest(request, plan, subset_records, folder, weights_name, base_key, weights_sha, dtype, versions) -> dict:
    spec, config, schedule = request.spec, request.spec.config, request.schedule
    family = spec.family
    stamped = _stamped_fields(spec)
    macs = family.count_macs(config)
    used_slots = sorted({(s.expert, k) for s in plan.subsets for k in (*s.reads, *s.writes)})
    guided = family.guided_channels(config, request.guide_all_channels)
    model = {"family": family.name, "config": stamped["model/config"], "space": spec.space,
             "num_sublayers": len(plan.slots), "sublayers": list(plan.slots), "weights_sha256": weights_sha,
             "inputs": [tensor.record() for tensor in family.graph_inputs(config)],
             "output": family.graph_output(config).record(), "latent_layout": family.latent_layout}
    if spec.space == "latent":
        model["latent_scale"] = family.latent_scale
    if spec.max_prompt_tokens is not None:
        model["max_sequence_length"] = spec.max_prompt_tokens
    data = {
        "schema_version": manifest_io.SCHEMA_VERSION,
        "name": spec.name,
        "backend": request.backend,
        "precision": request.precision,
        "model": model,
        "sampler": request.sampler.to_dict(),
        "guidance": _guidance_record(request, guided),
        "schedule": {"compute": schedule.compute.astype(int).tolist(), "step_subset": list(plan.step_to_subset),
                     "source": schedule.source, "threshold": schedule.threshold, "mode": schedule.mode},
        "batch": request.batch.to_dict(),
        "cache_slots": [{"name": plan.prefixes[e] + plan.slots[k], "index": k, "dtype": dtype,
                         "shape": ["batch", *family.cached_shapes(config)[k]]} for e, k in used_slots],
        "weights": manifest_io.file_entry(folder, weights_name, base_key),
        "subsets": subset_records,
        "macs": {"always": macs.always, "attn": macs.attn, "mlp": macs.mlp, "full": macs.full,
                 **_schedule_macs(spec, schedule, plan),
                 **({"prompt_tokens": family.macs_prompt_length(config)} if family.macs_prompt_length(config)
                    else {})},
        "versions": versions,
    }
    if request.backend == "tensorrt":
        data["tensorrt"] = {"timing_cache": manifest_io.file_entry(folder, "timing.cache"), "stripped_plans": True}
    return data


def _schedule_macs(spec: ModelSpec, schedule: Schedule, plan: BuildPlan) -> dict:
    """``schedule_fraction`` and ``ideal_speedup``: the schedule's MACs over full compute's, each call counted with
    the MACs of the expert it runs."""
    if plan.step_expert is None:
        macs = spec.family.count_macs(spec.config)
        return {"schedule_fraction": schedule.mac_fraction(macs), "ideal_speedup": schedule.ideal_speedup(macs)}
    counts = [spec.family.count_macs(config) for config in _expert_configs(spec)]
    used = sum(counts[e].of_subset(row) for e, row in zip(plan.step_expert, schedule.compute))
    fraction = used / sum(counts[e].full for e in plan.step_expert)
    return {"schedule_fraction": fraction, "ideal_speedup": 1.0 / fraction}


def _guidance_record(request: BuildRequest, guided: int) -> dict:
    """cfg_scale and guided channels; the family's guidance rule, the pipeline's name for its scale and, for a label
    model, the null class; the channels the sampler takes where the family's pipeline drops a learned-sigma half
    before its scheduler step."""
    spec = request.spec
    record = {"cfg_scale": float(spec.cfg_scale if request.cfg_scale is None else request.cfg_scale),
              "guided_channels": guided, **spec.family.guidance_record(spec.config)}
    sampler_channels = spec.family.sampler_channels(spec.config)
    if sampler_channels is not None:
        record["sampler_channels"] = sampler_channels
    return record


def _weight_table(universals, out_dir: Path, quantization: dict | None = None) -> list[dict]:
    """name, dtype, shape, offset, length (and for an int8 weight how it dequantizes) of every tensor in weights.bin
    (from the traces, each expert's, or the previous manifest when the weights were reused without tracing)."""
    if universals is None:
        return manifest_io.load(out_dir, verify_files=False)["weight_tensors"]
    from ..export.onnx import all_weights, weights_layout

    quantized = (quantization or {}).get("tensors", {})
    weights = all_weights(*universals)
    table = []
    for name, (offset, length) in weights_layout(*universals).items():
        entry = {"name": name, "dtype": str(weights[name].dtype),
                 "shape": list(weights[name].shape), "offset": offset, "length": length}
        if name in quantized:
            entry["quantization"] = quantized[name]
        table.append(entry)
    return table


def _quantization_record(quantization: dict | None, out_dir: Path) -> dict:
    """The manifest's ``quantization`` summary (the per-tensor records live in ``weight_tensors``)."""
    if quantization is None:  # weights reused without tracing: the previous build's record describes them
        return manifest_io.load(out_dir, verify_files=False)["quantization"]
    return {key: value for key, value in quantization.items() if key != "tensors"}
