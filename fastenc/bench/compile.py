"""The compile report: every kernel of a model's forward, built for a GPU architecture on a machine with no GPU.

``python -m fastenc.kernels.aot`` runs ``main``. ``fastenc.kernels.aot`` holds the compile-only target
(``compile_only``), reads each build and compiles the kernels width by width (``--sweep``); this module
adds what needs the model: one forward of each encoder family at the shape of a well-known checkpoint
(``encoder_for``: a one-layer ``Model`` over uninitialised CPU tensors, its kernels' layouts prepared as
at load), and the report's provenance (the source tree's commit).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

from fastenc.kernels import _target
from fastenc.kernels.aot import (BATCHES, DECODERS, DTYPES, FP8_MIN_ARCH, SPLADE_VOCAB, KernelBuild, compile_only, decoder_forward,
                                 decoder_sweep_report, markdown, positional_sweep_report, problems, sweep_report,
                                 tight, toolchain)

# Encoder shapes the report compiles for: (hidden, heads, intermediate, embedding) of well-known models;
# the families after BERT with their model_type and what decides their kernels' constexprs (two ModernBERT
# layers: one global, one local).
MODELS = {
    "bert-base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "minilm": dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "bert-large": dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
    "electra-small": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, embedding_size=128),
    "mpnet-base": dict(model_type="mpnet", hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                       max_position_embeddings=514),
    "modernbert-base": dict(model_type="modernbert", hidden_size=768, num_attention_heads=12, intermediate_size=1152,
                            num_hidden_layers=2, global_attn_every_n_layers=2),
    "nomic-embed": dict(model_type="nomic_bert", hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "gte-base": dict(model_type="gte", hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "deberta-v3-base": dict(model_type="deberta-v2", hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                            type_vocab_size=0, relative_attention=True, position_buckets=256,
                            pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                            position_biased_input=False),
}
# Decoder backbones (embedders and rerankers), compiled op by op (``decoder_forward``): one layer's kernels
# with the constexprs their families need. window: Gemma3's local layers (transformers' sliding_window - 1).

def encoder_for(model: str, dtype: torch.dtype):
    """A one-layer model of ``model``'s shape over uninitialised CPU tensors, on the Triton ops (an FP8
    encoder's, over weights quantized as at load, for ``torch.float8_e4m3fn``)."""
    from fastenc import checkpoint, family, fp8, kernels
    from fastenc.config import EncoderConfig
    from fastenc.model import Model

    shape = dict(MODELS[model])
    model_type = shape.pop("model_type", "electra" if "embedding_size" in shape else "bert")
    quantized = dtype == torch.float8_e4m3fn
    # FP8: two layers, so that the second's QKV takes the LayerNorm's codes (the first's quantizes its input)
    raw = dict(model_type=model_type, vocab_size=1024, num_hidden_layers=2 if quantized else 1,
               max_position_embeddings=512, type_vocab_size=2, pad_token_id=1)
    raw.update(shape)
    config = EncoderConfig.from_dict(raw, source=model)
    shapes = checkpoint.encoder_shapes(config)
    load_dtype = torch.float32 if quantized else dtype
    tensors = {name: torch.empty(shapes[name], dtype=load_dtype) for name in checkpoint.encoder_names(config)}
    # the kernels' layouts and DeBERTa's tables, as at load
    tensors = family.prepare(tensors, config.family, config.num_attention_heads,
                             checkpoint.num_unique_layers(config), eps=config.layer_norm_eps)
    ops = kernels
    if quantized:
        dtype = fp8.ACTIVATION_DTYPE
        tensors, ops = fp8.quantize_weights(tensors, dtype), fp8.Fp8Ops(kernels, dtype)
    return Model(config, tensors, device=torch.device("cpu"), dtype=dtype, backend="triton", ops=ops,
                 cuda_graphs=False)


def compile_report(archs=(90, 80), dtypes=("fp16", "bf16"), models=("bert-base", "minilm")) -> list[KernelBuild]:
    """Compile every kernel of an encoder forward for each architecture, dtype and model shape."""
    from fastenc import kernels

    builds = []
    for arch in archs:
        for dtype in dtypes:
            if dtype == "fp8" and arch < FP8_MIN_ARCH:
                continue  # no FP8 tensor cores: the FP8 encoder refuses to load there
            for model in models:
                if model in DECODERS and dtype == "fp8":
                    continue  # the decoders' FP8 GEMMs are the encoders' kernels (compiled above)
                if model in DECODERS:
                    with compile_only(arch) as driver:
                        for lengths in BATCHES:
                            decoder_forward(model, DTYPES[dtype], lengths)
                        builds.extend(driver.builds(dtype, model))
                    continue
                encoder = encoder_for(model, DTYPES[dtype])
                with compile_only(arch) as driver:
                    for lengths in BATCHES:
                        ids = torch.ones(len(lengths), max(lengths), dtype=torch.long)
                        mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
                        packed = encoder.pack(ids, mask)
                        hidden = encoder.forward(packed)
                    norm = encoder.config.hidden_size
                    # The MLM head's transform, the one kernel the encoder itself does not launch.
                    kernels.gelu_layer_norm(hidden, torch.empty(norm, dtype=hidden.dtype),
                                            torch.empty(norm, dtype=hidden.dtype), 1e-12, encoder.config.activation)
                    # The SPLADE head's fused kernel at BERT's vocabulary (a partial last tile), both variants.
                    decoder = torch.empty(SPLADE_VOCAB, norm, dtype=hidden.dtype)
                    for pooling, activation in (("max", "relu"), ("sum", "log1p_relu")):
                        kernels.splade_pool(hidden, decoder, torch.empty(SPLADE_VOCAB, dtype=hidden.dtype),
                                            packed.cu_seqlens, pooling, activation)
                    builds.extend(driver.builds(dtype, model))
    return builds


def environment() -> dict:
    """The toolchain the builds depend on, the source tree's commit and the time."""
    from fastenc.bench.report import git_commit

    return {**toolchain(), "commit": git_commit(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastenc.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities as integers, e.g. 90,80,86")
    parser.add_argument("--dtype", default="fp16,bf16", help=f"from {', '.join(DTYPES)}")
    parser.add_argument("--models", default="bert-base,minilm", help=f"from {', '.join([*MODELS, *DECODERS])}")
    parser.add_argument("--markdown", type=Path, help="write the table here too")
    parser.add_argument("--json", type=Path, help="write the builds as JSON here")
    parser.add_argument("--positional", action="store_true", help="with --sweep: the windowed, relative-bias and "
                        "disentangled attention (ModernBERT, MPNet, DeBERTa) at every head dim, instead")
    parser.add_argument("--decoder", action="store_true", help="with --sweep: the decoders' causal attention, "
                        "fused QKV with QK-norm and RMSNorms at every head dim and width, instead")
    parser.add_argument("--sweep", action="store_true", help="attention at every head dim, the row kernels at "
                        "every width and MaxSim at every multi-vector dim, instead of model forwards")
    args = parser.parse_args(argv)
    if _target.INTERPRETED:
        parser.error("TRITON_INTERPRET is set: the interpreter replaces Triton's compiler; unset it")
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        parser.error(f"--arch: {args.arch!r} is not a list of integers such as 90,80")
    dtypes, models = args.dtype.split(","), args.models.split(",")
    for name, allowed in (("dtype", DTYPES), ("models", {**MODELS, **DECODERS})):
        unknown = [v for v in getattr(args, name).split(",") if v not in allowed]
        if unknown:
            parser.error(f"--{name}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if args.positional and args.decoder:
        parser.error("--positional and --decoder are two different sweeps: choose one")
    if args.sweep:
        builds = (positional_sweep_report(archs, dtypes) if args.positional else
                  decoder_sweep_report(archs, dtypes) if args.decoder else sweep_report(archs, dtypes))
    else:
        builds = compile_report(archs, dtypes, models)
    found, near = problems(builds), tight(builds)
    env = environment()
    command = "python -m fastenc.kernels.aot" + (" --sweep" if args.sweep else "") + (
        " --positional" if args.sweep and args.positional else "") + (" --decoder" if args.sweep and args.decoder else "")
    table = (f"Compiled by Triton {env['triton']} with {env['ptxas']}, on no GPU (`{command}`), "
             f"commit {env['commit']}, {env['time']}.\n\n" + markdown(builds)
             + ("\nProblems:\n" + "".join(f"- {p}\n" for p in found) if found else "\nNo problems: every build fits "
                "its shared memory and spills nothing.\n")
             + ("\nTight (no spill, no register headroom):\n" + "".join(f"- {p}\n" for p in near) if near else ""))
    sys.stdout.write(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        builds_json = [dataclasses.asdict(b) for b in builds]
        args.json.write_text(json.dumps({"env": env, "builds": builds_json, "problems": found, "tight": near}, indent=1) + "\n")
    return 1 if found else 0
