"""`python -m addp.evaluate`: FID / IS / KID / precision-recall of samples, through torch-fidelity.

Samples: a folder of images (its numbered files 000000.png ... when it has any, else every
png/jpg below it), a samples.npz (uint8 N x H x W x 3 under "arr_0"), or "digits" (the
held-out split of the bundled digits, the reference for the demo). All the same size.

Reference: the same kinds (a folder may hold class subfolders, as ImageNet-val does; its
images are resized and centre-cropped to the samples' size, --preprocess), or a statistics
.npz in ADM's convention ("mu", "sigma"; "features" for KID / precision-recall). Statistics
of a folder or npz are cached on disk (--stats-cache), keyed by its files' names, sizes and
times, the feature extractor, the image size and the preprocessing; --save-reference-stats
writes them as a statistics file.

Images are streamed in batches through the feature extractor: memory holds the features,
never all the images.

Features come from one of
  --feature-extractor classifier.safetensors   one of our classifiers (offline; how digits are
                                                judged): pooled features for FID/KID/PRC,
                                                logits for IS; also reports its mean max-probability
  --inception-weights FILE                      torch-fidelity's Inception-v3 (the standard FID);
                                                without the flag, only an already cached copy is used.
Nothing is ever downloaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


from .cli import ArgumentParser, add_runtime_args, existing_file, output_file, positive_int, run_command
from .errors import AddpError
from .runs.files import atomic_write
from .evaluation.features import INCEPTION_FILE, METRICS, load_classifier
from .evaluation.images import PREPROCESS
from .evaluation.metrics import evaluate
from .evaluation.reference_stats import default_cache_dir


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser("evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default=None, help="folder of images or samples.npz (optional with --save-reference-stats)")
    p.add_argument("--reference", required=True, help="folder of images (class subfolders allowed), an images .npz, "
                                                       "a statistics .npz (mu, sigma), or 'digits'")
    p.add_argument("--metrics", default="fid", help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--feature-extractor", type=existing_file, default=None,
                   help="one of our classifier checkpoints (.safetensors)")
    p.add_argument("--inception-weights", type=existing_file, default=None, help=f"local {INCEPTION_FILE}")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="size the reference images are resized and centre-cropped to (default: the samples' size)")
    p.add_argument("--preprocess", default="addp", choices=PREPROCESS,
                   help="reference preparation: ADDP's (torchvision Resize + CenterCrop) or ADM's center_crop_arr")
    p.add_argument("--stats-cache", default=str(default_cache_dir()), help="folder caching reference statistics")
    p.add_argument("--no-stats-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--save-reference-stats", type=output_file, default=None, metavar="PATH",
                   help="write the reference statistics here (ADM's .npz convention: mu, sigma, features)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    add_runtime_args(p, seed=False, precision=None)
    p.add_argument("--output", type=output_file, default=None, help="also write the result as JSON here")
    p.add_check(_check_options)
    return p


def _check_options(args) -> None:
    if args.feature_extractor and args.inception_weights:
        raise AddpError("give --feature-extractor or --inception-weights, not both")
    args.metric_names = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    bad = sorted(set(args.metric_names) - set(METRICS))
    if bad or not args.metric_names:
        raise AddpError(f"--metrics: unknown metrics {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")


def main(args) -> dict:
    classifier = load_classifier(args.feature_extractor) if args.feature_extractor else None
    result = evaluate(args.samples, args.reference, args.metric_names, classifier, args.inception_weights,
                      args.batch_size, args.device, args.preprocess, None if args.no_stats_cache else args.stats_cache,
                      args.image_size, args.save_reference_stats)
    result.update(samples=args.samples, reference=args.reference,
                  features=args.feature_extractor or "inception-v3")
    if args.output:
        text = json.dumps(result)
        atomic_write(args.output, lambda tmp: Path(tmp).write_text(text + "\n"))
    return result


def cli(argv=None) -> int:
    return run_command("evaluate", get_args_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
