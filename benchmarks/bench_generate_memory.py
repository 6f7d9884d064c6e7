"""Peak memory of generating N tokens: ours vs the release's all-layer hidden states (row 9).

Run once per variant, each in a fresh process (benchmarks/run.py does this):

    python benchmarks/bench_generate_memory.py --variant ours    --config weights/small/tiny.yaml
    python benchmarks/bench_generate_memory.py --variant release --config weights/small/tiny.yaml

Both variants run `MiniGPT5_Model.generate` on the same prompt and seed, with `[IMG0]` forced
first and exactly `--tokens` new tokens (the end-of-sequence token is suppressed and the stop
string removed, so every run does the same amount of decoding), then draw the image with a few
SD steps.
- `ours`: `generate` as it is: transformers' `generate` returns token ids only, and a hook on the
  decoder keeps the 8 last-layer voken states while decoding (`generation.VokenStateRecorder`).
- `release`: transformers' `generate` with `output_hidden_states=True, return_dict_in_generate=True`
  (what the release did), every layer's states of every step kept until the image is drawn, and the
  voken features read from the last layer of those kept states.

The process's resident-set high-water mark is reset after the model is loaded (writing 5 to
/proc/self/clear_refs, Linux) and read after generation (VmHWM in /proc/self/status), so the
model's loading peak does not hide generation's. (`ru_maxrss` would not do: a child started by
fork + exec inherits its parent's resident size at the fork into `ru_maxrss`, and clearing the
high-water mark does not reset that -- a benchmark parent holding 1.6 GB makes every child report
1.6 GB.) Prints one JSON line: peak RSS of the whole call and of its language part
(up to the SD pipeline), their growth above the loaded model, the bytes of hidden states the
release variant kept, and a checksum of the voken features (equal in both variants up to float
rounding).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import generation  # noqa: E402

PROMPT = "###Human: generate image with caption: a red circle on a blue background ###Assistant:"


def current_rss_mb() -> float:
    """Resident set size now, in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Resident-set high-water mark of this process (VmHWM) in MiB; falls back to `ru_maxrss`
    where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    """Load the model, reset the peak, generate, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("ours", "release"), required=True)
    parser.add_argument("--config", required=True, help="model config YAML (the small preset)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--sd_steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from configuration import load_config
    from constants import VOKEN_COUNT
    from model import MiniGPT5_Model

    torch.manual_seed(0)
    model = MiniGPT5_Model(load_config(args.config), stage=2).eval()
    llm = model.model.llama_model
    original_generate = llm.generate
    kept = {}

    def forced_generate(*a, generation_config, **kw):
        """transformers' generate with exactly `--tokens` new tokens (and, for the release variant,
        every layer's hidden states returned and kept)."""
        config = copy.deepcopy(generation_config)
        config.stop_strings = None
        config.min_new_tokens = config.max_new_tokens = args.tokens
        if args.variant == "release":
            config.output_hidden_states = True
            config.return_dict_in_generate = True
            out = original_generate(*a, generation_config=config, **kw)
            kept["out"] = out                    # alive until the end, as the release kept it
            return out.sequences
        return original_generate(*a, generation_config=config, **kw)

    def features_from_kept_states(backbone, embeds, mask, generated, recorder=None):
        """The release's readout: the last layer of every step's kept states."""
        states = torch.cat([step[-1] for step in kept["out"].hidden_states], dim=1)   # (B, P + N - 1, H)
        first = int((generated[0] == model.model.voken_ids[0]).nonzero()[0])
        start = embeds.shape[1] + first - 1
        return states[:, start:start + VOKEN_COUNT], [0]

    llm.generate = forced_generate
    if args.variant == "release":
        generation.voken_features = features_from_kept_states
    captured = {}
    original_map = model.map_vokens

    def spy(features):
        captured.setdefault("features", features.detach().clone())
        return original_map(features)

    model.map_vokens = spy
    original_images = generation.images_from_features

    def images(*a, **kw):
        """Note the peak of the language part (decoding and reading the voken features) before SD."""
        captured["decode_peak"] = peak_rss_mb()
        return original_images(*a, **kw)

    generation.images_from_features = images
    loaded = current_rss_mb()
    reset = reset_peak()
    out = model.generate(PROMPT, force_generation=True, seed=0, max_new_tokens=args.tokens,
                         num_inference_steps=args.sd_steps)[0]
    peak = peak_rss_mb()
    result = {"variant": args.variant, "peak_rss_mb": peak, "loaded_rss_mb": loaded, "growth_mb": peak - loaded,
              "decode_peak_rss_mb": captured["decode_peak"], "decode_growth_mb": captured["decode_peak"] - loaded,
              "peak_was_reset": reset, "new_tokens": len(out.token_ids),
              "features_sum": float(captured["features"].double().sum()), "image": out.image is not None,
              "hidden": llm.config.hidden_size}
    if args.variant == "release":
        steps = kept["out"].hidden_states
        result.update(kept_states_mb=sum(t.numel() * t.element_size() for step in steps for t in step) / 2**20,
                      layers_kept=len(steps[0]), positions=sum(step[-1].shape[1] for step in steps))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
