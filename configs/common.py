"""Shared config for the three training stages. Stage files only override what differs.

Variants come as a comma-separated argument after the config path, e.g.
  --config=configs/stage2.py:model=1.3b           the 1.8B model (CLIP-L + Mamba-2 1.3B)
  --config=configs/stage2.py:demo                 tiny model on the synthetic demo data
  --config=configs/stage2.py:model=3.1b,remat=sqrt
Any field can still be overridden on the command line: --config.optim.lr_llm=2e-5.
"""

from __future__ import annotations

import ml_collections

# Model presets: models/video_presets.py (0.7b, 1.8b, 3.1b; tiny for tests and the demo).
# Remat policies: remat/policies.py. Allowed values: train/config_check.py.


def parse_args(arg: str | None) -> dict[str, str]:
  """'model=1.3b,demo' -> {'model': '1.3b', 'demo': ''}."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip()
  unknown = set(out) - {"model", "demo", "remat"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; known: model=<size>, "
                     f"demo, remat=<policy>")
  return out


def get_base_config(stage: int, arg: str | None) -> ml_collections.ConfigDict:
  args = parse_args(arg)
  c = ml_collections.ConfigDict()
  # Which training stage: 1 alignment, 2 long-video knowledge, 3 instruction tuning.
  c.stage = stage
  # Seed of parameter init, data order and dropout-free training randomness.
  c.seed = 0
  # Checkpoint to start from: a previous stage's workdir, or a converted checkpoint
  # (python -m ma2mba_jax.convert); '' starts from random init (or resumes the workdir).
  c.init_from = ""

  c.model = ml_collections.ConfigDict()
  # Video-Ma²mba preset: 0.7b, 1.8b, 3.1b or tiny.
  c.model.preset = "3.1b"
  # Matmul / SSD input dtype; parameters stay float32 (master weights).
  c.model.compute_dtype = "bfloat16"
  # SSD backend: auto | xla | pallas | triton.
  c.model.ssd_impl = "auto"
  # Frames encoded per vision micro-batch (under remat), bounds encoder memory.
  c.model.frames_per_microbatch = 16
  # Local HF CLIP / SigLIP vision directory the encoder starts from in a fresh stage ('' none).
  c.model.vision_init = ""
  # Local HF Mamba2ForCausalLM / state-spaces Mamba-2 directory the LM starts from ('' none).
  c.model.llm_init = ""

  c.data = ml_collections.ConfigDict()
  # Folder written by `python -m ma2mba_jax.data.synthetic`; sets `sources` from its manifest.
  c.data.synthetic_dir = ""
  # {split: [{format: llava|webvid|scenewalk, annotations: file, media_root: dir}]}.
  c.data.sources = ml_collections.ConfigDict()
  # Local tokenizer.json (GPT-NeoX's for the real models); default: the synthetic set's.
  c.data.tokenizer = ""
  # Append missing chat-template special tokens (GPT-NeoX's tokenizer lacks four of them).
  c.data.add_special_tokens = False
  # Frames per second sampled from videos (the paper: 1 FPS, every frame).
  c.data.fps = 1.0
  # Frames and tokens per example; examples are padded (or packed) to these.
  c.data.max_frames = 3600
  c.data.max_tokens = 524_288
  # Pack several short examples into one row.
  c.data.packing = False
  # With packing: decoded examples the packer looks ahead over to fill a row (best fit);
  # 1 is the greedy in-order packer (rows of SceneWalk-like lengths ~85% full, 16: ~99%).
  # Held in host memory; a resume decodes again about 4x this many (data/batching.py).
  c.data.pack_window = 16
  # Length buckets without packing (issue 17): None pads every batch to max_tokens; "auto"
  # to the smallest of 256, 512, ... max_tokens holding its longest row; or a list.
  c.data.bucket_lengths = None
  # Grain worker processes and per-worker prefetch (0 workers: decode in this process).
  c.data.num_workers = 8
  c.data.worker_buffer_size = 2
  # Skip (and count) bad samples instead of stopping with an error that names them.
  c.data.skip_bad = False
  # Stage 3: QA pairs of one video packed into one sample (None: all of them).
  c.data.qa_per_sample = None
  # Open every video's header when the sources are read, naming missing/unreadable files
  # before the model is built.
  c.data.validate_media = True

  c.optim = ml_collections.ConfigDict()
  # Peak learning rates per parameter group; a group is frozen when its lr is 0.
  c.optim.lr_llm = 4e-5
  c.optim.lr_vision = 4e-6
  c.optim.lr_projector = 4e-5
  # AdamW (paper: betas 0.9 / 0.95, weight decay 0.05), global-norm clip 1.0.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.grad_clip = 1.0
  # Cosine schedule with linear warmup over this fraction of the steps.
  c.optim.warmup_frac = 0.1
  # Examples per optimizer step, summed over devices and micro-batches.
  c.optim.global_batch = 32
  # Examples per device per forward/backward; global_batch / (devices * this) = grad accum.
  c.optim.micro_batch = 1
  # Adam moments' storage dtype: float32 | bfloat16 (half the bytes; the update is computed
  # in float32). bfloat16 needs 1 - b1 and 1 - b2 >= 2^-8 (train/optim.py).
  c.optim.moments_dtype = "float32"
  # Where the optimizer state lives between steps: device | host (pinned host memory, moved
  # to the device for the update) | auto (with the measuring MA-GC planner: host when the
  # fastest setting that fits needs the room; else device. train/trainer.py resolved_memory).
  c.optim.state_memory = "auto"

  c.remat = ml_collections.ConfigDict()
  # none | layer | sqrt | magc (multi-axis: l layers x s tokens).
  c.remat.policy = args.get("remat") or "magc"
  # MA-GC layers per group and tokens per time block (a multiple of the SSD chunk), as
  # numbers in strings ('8', '4096') or 'auto' (the paper's memory model picks them).
  c.remat.l = "auto"
  c.remat.s = "auto"
  # What a cell keeps inside for its backward: nothing | layers | dots | names
  # (remat/cells.py), or auto (planner=measure: the fastest that fits; else nothing).
  c.remat.cell_saves = "auto"
  # With cell_saves=names: activations to keep (tags in models/mamba2.py).
  c.remat.save_names = ()
  # Checkpoints kept in host memory instead of on the device: none | sequence (each cell's
  # input states) | all (and each cell's input h). Bounds length by host RAM (remat/cells.py).
  # auto (planner=measure): none if it fits, else the least offload that fits.
  c.remat.offload = "auto"
  # With l/s=auto: activation budget in GB (None: planner=measure takes the device's memory
  # less weights, gradients and optimizer state; planner=model the least memory).
  c.remat.budget_gb = ml_collections.FieldReference(None, field_type=float)
  # How MA-GC's 'auto' is chosen: measure (XLA's compiled memory) | model (paper's Table 7).
  c.remat.planner = "measure"

  c.train = ml_collections.ConfigDict()
  # Optimizer steps in this stage.
  c.train.steps = 1000
  # Console / JSONL / TensorBoard every this many steps.
  c.train.log_every = 10
  # Stop (resumably) after this step, e.g. to fit a time slot; 0 runs to train.steps.
  c.train.stop_at_step = 0
  # Fields a rerun may change in a workdir made with other values, e.g. 'optim.lr_llm,
  # init_from' (a section name allows all its fields); see train/workdir.py.
  c.train.allow_changes = ""

  c.ckpt = ml_collections.ConfigDict()
  # Save every this many steps (and at the end), asynchronously.
  c.ckpt.every_steps = 500
  # Keep the newest this many checkpoints, plus every keep_period-th step forever.
  c.ckpt.max_to_keep = 3
  c.ckpt.keep_period = ml_collections.FieldReference(None, field_type=int)

  c.eval = ml_collections.ConfigDict()
  # Validation loss every this many steps (0: only at the end), on this many batches.
  c.eval.every_steps = 0
  c.eval.batches = 8

  c.mesh = ml_collections.ConfigDict()
  # Device mesh axes: data parallel and FSDP (parameters and optimizer state sharded).
  # -1 takes all devices left over.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  # Sequence parallel: each sample's tokens split over this many devices (train/sequence.py;
  # MA-GC time blocks inside a piece run as a wavefront over them, remat/pipeline.py).
  c.mesh.seq = 1
  # ZeRO-1 (the paper's layout): optimizer state also sharded over `data`, params replicated.
  c.mesh.zero1 = False

  if args.get("model"):
    c.model.preset = args["model"]
  if "demo" in args:
    apply_demo(c)
  validate(c)
  return c


def apply_demo(c: ml_collections.ConfigDict) -> None:
  """The demo: tiny model on the synthetic data (python -m ma2mba_jax.data.synthetic)."""
  c.model.preset = "tiny"
  c.model.compute_dtype = "float32"
  c.model.ssd_impl = "xla"
  c.model.frames_per_microbatch = 4
  c.data.synthetic_dir = "runs/demo/data"  # what scripts/demo.sh writes
  c.data.max_frames = 16
  c.data.max_tokens = 512
  c.data.num_workers = 0
  c.optim.lr_llm = 3e-3
  c.optim.lr_vision = 1e-3
  c.optim.lr_projector = 3e-3
  c.optim.global_batch = 8
  c.optim.micro_batch = 4
  c.remat.s = "auto"
  c.train.steps = 60
  c.train.log_every = 10
  c.ckpt.every_steps = 30
  c.eval.batches = 2


def validate(c: ml_collections.ConfigDict) -> None:
  """Fails fast on values out of range, naming the field (the trainer checks again after
  command-line overrides)."""
  from ma2mba_jax.train import config_check
  config_check.validate(c)
