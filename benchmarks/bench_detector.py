"""Mask R-CNN detector latency, peak RSS and training step time on a CPU (a script, not a test).

For each backbone (EfficientNet-Lite0-FPN, the CPU default, and ResNet-50-FPN, the papers'
setting; random weights: timing does not depend on them), one fresh process (so each peak RSS is
its own) measures:

- eval latency on one 1024x832 grey image (a prepared mammogram, long side 1024): median of
  ``--runs`` after one warm-up, and where it goes (backbone, FPN, RPN, box head, mask head, mask
  pasting at full size as torchvision does, and into each box as mammocad does) -- with untrained
  heads every one of the ``box_detections_per_img`` (100) slots is filled, the worst case for the
  mask head and the pasting, which cost per detection;
- the path ``mammocad predict`` takes (``detect.infer``: whole image, masks pasted into their boxes,
  merging), with the backbone in fp32 and in bf16, at 100 and at 30 detections (the shipped
  detectors' ``box_detections_per_img``);
- the same with torchvision's RPN test settings (pre/post NMS top-n 1000/1000 instead of 500/200)
  and with 20 detections per image, to show what those settings buy;
- peak RSS (``ru_maxrss``) after building, after inference, and after training;
- one training step (forward + backward + SGD step) on a batch of 2 x 512x512 patches with one
  lesion each: median of ``--train-steps`` after one warm-up.

    .venv/bin/python benchmarks/bench_detector.py [--threads 2] [--runs 5] [--train-steps 3]
        [--fpn-channels 128] [--backbones efficientnet_lite0,resnet50]

On a machine shared with other jobs, ``--threads 1`` gives steady figures (two OpenMP threads stall
whenever one is descheduled). Target (issue): Lite0 detector <= 0.6 s per prepared mammogram on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections import OrderedDict


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _mammogram(h: int = 1024, w: int = 832):
    """A grey breast-like image in [0, 1]: a bright half-ellipse with smooth texture on black."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(0, 1, w), indexing="ij")
    breast = (yy**2 + (xx / 0.85) ** 2 < 1).float()
    texture = F.avg_pool2d(torch.rand(1, 1, h + 8, w + 8, generator=g), 9, stride=1)[0, 0]
    return (breast * (0.45 + 0.8 * (texture - 0.5))).clamp(0, 1)[None]


def _lesion_patches(size: int = 512):
    import torch

    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, targets = [], []
    for cy, cx, r in ((180, 220, 40), (330, 300, 60)):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        x = _mammogram(size, size).clone()
        x[0][disc] = 0.85
        box = torch.tensor([[cx - r, cy - r, cx + r, cy + r]], dtype=torch.float32)
        images.append(x)
        targets.append({"boxes": box, "labels": torch.tensor([1]), "masks": disc[None].to(torch.uint8)})
    return images, targets


def _median(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        out = None  # the previous result (100 full-size masks) must not inflate the next run's peak
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mammocad.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("maskrcnn", backbone=args.backbone, pretrained=False, fpn_channels=args.fpn_channels).eval()
    rss_built = _rss_mb()
    n_params = sum(p.numel() for p in model.parameters())
    x = _mammogram()
    res: dict[str, object] = {"backbone": args.backbone, "threads": torch.get_num_threads(), "params": n_params,
                              "fpn_channels": args.fpn_channels}
    with torch.no_grad():
        model([x])  # warm-up: first-call allocations, oneDNN kernel choice
        res["eval_s"], out = _median(lambda: model([x]), args.runs)
        res["detections"] = len(out[0]["boxes"])
        # where the time goes: the same forward, stage by stage
        images, _ = model.transform([x])
        rcnn = model.roi_heads
        parts = {}
        parts["transform"], _ = _median(lambda: model.transform([x]), args.runs)
        parts["backbone"], feats = _median(lambda: model.backbone.body(images.tensors), args.runs)
        parts["fpn"], pyramid = _median(
            lambda: model.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))), args.runs)
        parts["rpn"], (proposals, _) = _median(lambda: model.rpn(images, pyramid), args.runs)
        mask_pool, rcnn.mask_roi_pool = rcnn.mask_roi_pool, None  # no mask_roi_pool: the box branch alone
        parts["box_head"], _ = _median(lambda: rcnn(pyramid, proposals, images.image_sizes), args.runs)
        rcnn.mask_roi_pool = mask_pool
        both, (dets, _) = _median(lambda: rcnn(pyramid, proposals, images.image_sizes), args.runs)
        parts["mask_head"] = both - parts["box_head"]
        parts["paste_masks"], _ = _median(
            lambda: model.transform.postprocess(dets, images.image_sizes, [tuple(x.shape[-2:])]), args.runs)
        from mammocad.tasks import detect

        def paste_in_boxes():  # what mammocad does instead: each mask into its own box
            for m, b in zip(dets[0]["masks"], dets[0]["boxes"].numpy()):
                x0, y0 = int(b[0]), int(b[1])
                detect.mask_in_box(m[0], b, (y0, x0, max(int(b[3] + 1), y0 + 1), max(int(b[2] + 1), x0 + 1)))

        parts["paste_in_boxes"], _ = _median(paste_in_boxes, args.runs)
        res["parts_s"] = parts
        # the path `mammocad predict` takes: detect.infer on the whole image (merge, masks in boxes)
        settings = detect.InferenceSettings(class_names=("background", "benign", "malignant"), threshold=0.5,
                                            min_area=16, tile=1024, overlap=0.25, mode="whole", batch_size=1)
        pixels = x[0].numpy()
        for autocast in ("fp32", "bf16"):
            for n_det in (rcnn.detections_per_img, 30):
                keep, rcnn.detections_per_img = rcnn.detections_per_img, n_det
                res[f"infer_{autocast}_{n_det}_s"], _ = _median(
                    lambda: detect.infer(model, pixels, None, settings, autocast=autocast), args.runs)
                rcnn.detections_per_img = keep
        # test-time settings: torchvision's RPN top-n, and fewer detections
        pre, post = dict(model.rpn._pre_nms_top_n), dict(model.rpn._post_nms_top_n)
        model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = 1000, 1000
        res["eval_rpn_1000_1000_s"], _ = _median(lambda: model([x]), args.runs)
        model.rpn._pre_nms_top_n, model.rpn._post_nms_top_n = pre, post
        keep, rcnn.detections_per_img = rcnn.detections_per_img, 20
        res["eval_20_detections_s"], _ = _median(lambda: model([x]), args.runs)
        rcnn.detections_per_img = keep
    res["rss_built_mb"], res["rss_eval_mb"] = rss_built, _rss_mb()

    patches, targets = _lesion_patches()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    model.train()

    def step():
        loss = sum(model(patches, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    res["train_step_s"], _ = _median(step, args.train_steps)
    res["rss_train_mb"] = _rss_mb()
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--fpn-channels", type=int, default=128)
    ap.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backbone", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    for backbone in args.backbones.split(","):
        cmd = [sys.executable, __file__, "--worker", "--backbone", backbone, "--threads", str(args.threads),
               "--runs", str(args.runs), "--train-steps", str(args.train_steps),
               "--fpn-channels", str(args.fpn_channels)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        parts = ", ".join(f"{k} {v:.3f}" for k, v in r["parts_s"].items())
        print(f"maskrcnn[{backbone}] fpn {r['fpn_channels']}: {r['params'] / 1e6:.2f} M parameters, "
              f"{r['threads']} thread(s), median of {args.runs}")
        print(f"  eval 1024x832 (defaults: RPN test top-n 500/200, {r['detections']} detections)  "
              f"{r['eval_s']:.3f} s" + ("  (target <= 0.6 s)" if backbone == "efficientnet_lite0" else ""))
        print(f"    stages (s): {parts}")
        for key in sorted(k for k in r if k.startswith("infer_")):
            _, autocast, n_det, _ = key.split("_")
            print(f"  mammocad inference (detect.infer, {autocast} backbone, {n_det:>3} detections)      {r[key]:.3f} s")
        print(f"  eval with torchvision's RPN top-n 1000/1000              {r['eval_rpn_1000_1000_s']:.3f} s")
        print(f"  eval with box_detections_per_img 20                      {r['eval_20_detections_s']:.3f} s")
        print(f"  train step, 2 x 512x512 patches (forward+backward+SGD)   {r['train_step_s']:.3f} s")
        print(f"  peak RSS: built {r['rss_built_mb']:.0f} MB, after inference {r['rss_eval_mb']:.0f} MB, "
              f"after training {r['rss_train_mb']:.0f} MB")


if __name__ == "__main__":
    main()
