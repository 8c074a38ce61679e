"""Export a trained LoRA adapter for shipping: smaller dtype, base named by id, a description.

Reads a PEFT adapter directory (``<run>/adapter`` of ``dpo``/``dpa``), writes a new one with the
weights cast to ``--dtype`` (bf16 by default: half the bytes, and LoRA deltas lose nothing that
matters at inference), ``base_model_name_or_path`` set to ``--base-name`` (a model id, never a
path of the machine that trained it), ``metadata.json`` (``description`` is what ``Describe``
reports, plus the source run's summary when it has one) and, with ``--readme``, a README.md copied
in. The output is written to a temporary directory and renamed into place, so an interrupted
export leaves the old adapter (or nothing), never half of one. A mixture directory (``<run>/mixture``
of ``steer.train mixture``: ``mixture.json`` and one PEFT adapter per objective) is exported the
same way, every adapter in it.

Examples:
  python -m steer.train export --adapter runs/default-adapter/adapter --output steer/adapters/default \\
      --description "principle-guided DPA, LoRA r16, SmolLM2-135M-Instruct" --readme training/recipes/default-adapter.md
  python -m steer.train export --adapter runs/dpa/adapter --output /tmp/dpa-bf16
  python -m steer.train export --adapter runs/dpa/adapter --output out --dtype float16 --force
  python -m steer.train export --adapter runs/mix/mixture --output steer/adapters/mixture --force   # a mixture
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

PROG = "python -m steer.train export"
DTYPES = ("bfloat16", "float16", "float32")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def export_adapter(adapter: Path, output: Path, *, dtype: str = "bfloat16", base_name: str | None = None,
                   description: str = "", readme: Path | None = None, force: bool = False) -> Path:
    """Write the exported adapter to ``output`` (see the module docstring); returns ``output``."""
    import torch
    from safetensors.torch import load_file, save_file
    from steer.training.checkpoint import atomic_directory_write
    from steer.training.output_dir import check_output_dir

    from steer.errors import InvalidInput
    from steer.models import DEFAULT_MODEL_NAME

    adapter, output = Path(adapter), Path(output)
    mixture = (adapter / "mixture.json").is_file()
    if mixture:
        from steer.mixture import read_mixture_spec

        spec = read_mixture_spec(adapter, field="adapter")
        parts = [adapter / o for o in spec.objectives]
    else:
        parts = [adapter]
    for part in parts:
        for name in (CONFIG, WEIGHTS):
            if not (part / name).is_file():
                raise InvalidInput("adapter", f"{part} has no {name} (expected a PEFT adapter directory, "
                                              "e.g. <run>/adapter, or a mixture directory, <run>/mixture)")
    if dtype not in DTYPES:
        raise InvalidInput("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if readme is not None and not Path(readme).is_file():
        raise InvalidInput("readme", f"no such file: {readme}")
    # a file, or a place this process cannot write: refused before the weights are read
    check_output_dir(output, renamed_into_place=True)
    if output.is_dir() and any(output.iterdir()) and not force:
        raise InvalidInput("output", f"{output} is not empty; pass --force to replace it")
    def read(part: Path) -> tuple[dict, dict]:
        try:
            config = json.loads((part / CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise InvalidInput("adapter", f"{part / CONFIG}:{e.lineno}: not valid JSON ({e.msg})") from None
        config["base_model_name_or_path"] = base_name or config.get("base_model_name_or_path") or DEFAULT_MODEL_NAME
        if "/" in config["base_model_name_or_path"] and Path(config["base_model_name_or_path"]).is_absolute():
            raise InvalidInput("base_name", "the adapter names its base by a local path "
                                            f"({config['base_model_name_or_path']}); "
                                            "pass --base-name with the model id")
        tensors = load_file(str(part / WEIGHTS))
        return config, {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in tensors.items()}

    exported = [read(part) for part in parts]
    config, cast = exported[0]
    kind = (f"mixture of {len(parts)} LoRA r{config.get('r', '?')} adapters ({', '.join(p.name for p in parts)})"
            if mixture else f"LoRA r{config.get('r', '?')}")
    metadata = {"description": description or f"{kind} for {config['base_model_name_or_path']}",
                "dtype": dtype, "tensors": sum(len(c) for _, c in exported),
                "parameters": int(sum(v.numel() for _, c in exported for v in c.values()))}
    summary = adapter.parent / "summary.json"
    if summary.is_file():
        try:
            metadata["training"] = json.loads(summary.read_text())
        except json.JSONDecodeError:
            pass  # a run's summary is informative only

    def write(tmp: Path) -> None:
        for part, (part_config, part_cast) in zip(parts, exported):
            where = tmp / part.name if mixture else tmp
            where.mkdir(exist_ok=True)
            save_file(part_cast, str(where / WEIGHTS), metadata={"format": "pt"})
            (where / CONFIG).write_text(json.dumps(part_config, indent=2, sort_keys=True) + "\n")
        if mixture:
            spec_json = json.loads((adapter / "mixture.json").read_text())
            spec_json.update(base_model_name_or_path=config["base_model_name_or_path"],
                             description=metadata["description"])
            (tmp / "mixture.json").write_text(json.dumps(spec_json, indent=1) + "\n")
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        if readme is not None:
            shutil.copyfile(readme, tmp / "README.md")
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)  # package data: readable by every user of the install

    output.parent.mkdir(parents=True, exist_ok=True)
    return atomic_directory_write(output, write)


def main(argv: list[str] | None = None) -> int:
    from steer.errors import InvalidInput
    from steer.logs import add_log_level_flag, configure_logging

    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog=PROG, description="\n\n".join(parts[:2]), epilog="\n\n".join(parts[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory to export (e.g. runs/dpa/adapter)")
    parser.add_argument("--output", required=True, help="directory to write (replaced atomically with --force)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights dtype (default: bfloat16)")
    parser.add_argument("--base-name", default=None,
                        help="model id for base_model_name_or_path (default: keep the adapter's, "
                             "which steer writes as the model id for --model default)")
    parser.add_argument("--description", default="", help="one line for metadata.json (what Describe reports)")
    parser.add_argument("--readme", default=None, help="a Markdown file copied in as README.md")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    add_log_level_flag(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        out = export_adapter(Path(args.adapter), Path(args.output), dtype=args.dtype, base_name=args.base_name,
                             description=args.description, readme=Path(args.readme) if args.readme else None,
                             force=args.force)
    except InvalidInput as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {args.adapter} -> {out} ({args.dtype}, {size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
