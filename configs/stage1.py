"""Stage 1, cross-modal alignment: only the projector trains (paper: 790K image/video-text
pairs, lr 1e-3, global batch 512).

  python -m ma2mba_jax.main --config=configs/stage1.py:model=3.1b --workdir=runs/stage1
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_base_config(1, arg)
  # Projector only: LLM and vision encoder frozen (lr 0).
  c.optim.lr_llm = 0.0
  c.optim.lr_vision = 0.0
  c.optim.lr_projector = 1e-3
  if c.model.preset != "tiny":
    c.optim.global_batch = 512
  # Short clips and images.
  c.data.max_frames = min(c.data.max_frames, 16 if c.model.preset == "tiny" else 64)
  c.data.max_tokens = min(c.data.max_tokens, 512 if c.model.preset == "tiny" else 16_384)
  if "demo" in common.parse_args(arg):
    # The paper starts from a pretrained Mamba-2 and CLIP; no tiny ones exist, so the demo's
    # first stage also teaches the LM the captions' language and the encoder to see.
    c.optim.lr_llm = 3e-3
    c.optim.lr_vision = 1e-3
    c.optim.lr_projector = 3e-3
    # An image or a 3-5 s clip and its caption fit in 128 tokens: shorter rows, more of
    # them per step.
    c.data.max_frames = 8
    c.data.max_tokens = 128
    c.optim.global_batch = 32
    c.optim.micro_batch = 16
  return c
