"""Every setting of a run, as frozen dataclasses: the schema that profiles (qr_lib/profiles/*.json) fill in.

One dataclass per stage, grouped in `Profile`. They hold values and a few derived helpers, nothing else,
so every module can take a typed `Profile` without importing the stages that use its parts. Loading a
profile (files, overrides, did-you-mean checks, validation) is workbook/profiles.py. A default that is a
measurement or the paper's says so beside it; the others are settings.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

UNQUANTIZED = 16                  # a "bit-width" that leaves a block unquantized (baselines)
DEFAULT_BIT_LADDER = (2, 3, 4, 8)
DEFAULT_RANK_LADDER = (4, 8, 16)
# The benchmarks qr_lib reads offline (data.py); lm-eval runs them as tasks qr_<name> (qr_lib/tasks/).
BENCHMARKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa",
              "mmlu", "gsm8k")
TASKS = tuple(f"qr_{t}" for t in BENCHMARKS)
SCHEDULES = ("linear", "cosine", "constant")   # the learning rate after warm-up (algorithm/train.py)
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DataConfig:
    # "commonsense" (offline mix of train splits), "alpaca" (hub), or a local .jsonl / .csv file
    # (absolute, or relative to the repository root) with the columns of local_pool()
    finetune: str = "commonsense"
    text: str = "lambada"          # offline passages; "wikitext2" or "c4" with a hub
    n_train: int = 2000            # fine-tuning pairs
    n_val: int = 128               # search-validation pairs: the proxy's only scoring data
    n_test: int = 512              # test pairs: read only by the final comparison
    n_dev: int = 0                 # design pairs: score the sizing curves and the proxy check
    n_calib: int = 32              # calibration passages (Phase I)
    n_heldout: int = 64            # held-out passages (perplexity)
    seed: int = 0


@dataclass(frozen=True)
class QuantConfig:
    backend: str = "hqq"           # "hqq" (2, 3, 4, 8 bits) or "bnb" (4 = NF4, 8 = int8)
    # HQQ weights per scale/zero. It must divide every quantized linear's in_features, so that no
    # group spans two output rows (HQQ groups the flattened weight). The paper's code uses 128.
    group_size: int = 128
    hqq_optimize: bool = True      # HQQ's half-quadratic optimizer (slower, better) vs plain rounding
    bnb_double_quant: bool = True  # QLoRA's double quantization of NF4 absmax
    dequantize_once: bool = True   # CPU only: compute with the dequantized weight (see module docstring)

    def quantizer_settings(self) -> dict:
        """The settings that change the stored codes (the block cache's key); not how they compute."""
        return {k: v for k, v in asdict(self).items() if k != "dequantize_once"}


@dataclass(frozen=True)
class LoraSettings:
    alpha_ratio: float = 2.0   # alpha = alpha_ratio x rank (the authors' code uses 2)
    dropout: float = 0.05


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 3
    # After warm-up: "linear" decays to zero at the last step (Hugging Face Trainer's default),
    # "cosine" likewise along a half cosine, "constant" keeps the peak rate.
    schedule: str = "linear"
    max_len: int = 128
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class SensitivityConfig:
    bits: tuple = (2,)       # rungs to profile; the paper profiles the lowest one
    seq_len: int = 128
    batch_size: int = 4


@dataclass(frozen=True)
class NSGAConfig:
    pop_size: int = 8
    generations: int = 3
    seed: int = 0
    n_random: int = 4               # random allocations in the first generation (coverage)
    mutation_prob: float = 0.1      # prob. that a block mutates
    crossover_prob: float = 0.9
    low_steps: int = 0              # > 0: two proxy levels, children scored with this many steps
    low_n_val: int = 32
    promote: int = 2                # full-level re-scores per generation (two levels only)


@dataclass(frozen=True)
class BOConfig:
    iterations: int = 3
    alpha: float = 0.6        # weight of performance against memory in the utility
    ei_tol: float = 1e-4
    xi: float = 0.01          # EI exploration margin (in utility units)
    seed: int = 0


@dataclass(frozen=True)
class LimitsConfig:
    """A run whose estimate (workbook/estimate.py) passes these stops before any work. Settings: a week
    of training steps, timed at what a finished run of the profile measured or else at a floor no CPU
    or GPU step beats (so only absurd sizes are refused on a machine that has measured nothing), and
    a peak memory the machine has."""
    max_hours: float = 168.0
    floor_step_seconds: float = 0.01
    # The estimated peak of a training process (estimate.py) must fit this many GiB; None = the memory
    # of the machine (or GPU) at hand.
    max_memory_gib: float | None = None


@dataclass(frozen=True)
class ParallelConfig:
    backend: str = "serial"        # "serial" or "dask"
    workers: int = 2               # local CPU workers (on CUDA: one per visible GPU instead)
    threads_per_worker: int = 1    # torch threads per worker; workers x threads <= cores
    address: str | None = None     # a running Dask scheduler to use instead of a local cluster
    retries: int = 2               # times a task whose worker died is retried elsewhere


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 1.0
    max_steps: int | None = None   # a cap; None = the whole `epochs` (the paper's recipe)
    batch_size: int = 4
    grad_accum: int = 1            # the authors' code: 4
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    schedule: str = "linear"       # after warm-up; see train.TrainConfig
    max_len: int = 128             # the authors' code: 512
    n_test: int | None = None      # test pairs scored per run (the first n); None = the whole split
    seeds: tuple = (0, 1, 2)       # for methods with "multi_seed"; the others run seeds[0]
    methods: tuple | None = None   # method ids a full run covers; None = every file in methods/
    # Seeds whose runs also score the dev split (the proxy check's final side); None = every seed.
    # Scoring costs as much as a short fine-tune on a CPU, and the proxy check needs one seed's.
    dev_seeds: tuple | None = None

    def scores_dev(self, seed: int) -> bool:
        return self.dev_seeds is None or seed in self.dev_seeds

    def recipe(self) -> "FinetuneConfig":
        """What one run does, without the plan (which seeds and methods run, which score the dev split):
        what a run's cache key holds (a run's own seed and dev flag are keyed on their own)."""
        return replace(self, seeds=(), methods=None, dev_seeds=None)

    def steps(self, n_train: int) -> int:
        """A run's optimizer steps over `n_train` pairs: `epochs` of them, capped by `max_steps`: the one
        formula for a fine-tune's length (training, the estimate and the length study read it)."""
        steps = math.ceil(self.epochs * n_train / (self.batch_size * self.grad_accum))
        return min(steps, self.max_steps) if self.max_steps else steps

    def train_config(self, n_train: int, seed: int) -> TrainConfig:
        steps = self.steps(n_train)
        return TrainConfig(steps=steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                           warmup_steps=max(1, round(self.warmup_ratio * steps)), schedule=self.schedule,
                           max_len=self.max_len, seed=seed)


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple = TASKS
    limit: int | None = 200            # documents per task; None = the full split
    task_limits: dict = field(default_factory=dict)  # per-task overrides of `limit`
    batch_size: int = 8
    max_gen_toks: int = 256
    # Final runs whose seed is listed are benchmarked (None = every seed); every run gets its test
    # loss and perplexity. On a CPU, lm-eval costs as much as the fine-tune itself.
    seeds: tuple | None = None
    # Methods benchmarked (None = every method whose file allows it): the main ones, where lm-eval
    # adds information rather than time.
    methods: tuple | None = None

    def benchmarks(self, seed: int, method: str) -> bool:
        return bool(self.tasks) and (self.seeds is None or seed in self.seeds) and \
            (self.methods is None or method in self.methods)


@dataclass(frozen=True)
class PilotConfig:
    steps: int = 40                # the pilot's length: one epoch of steps x batch x grad_accum fresh pairs
    seeds: tuple = (0, 1, 2)
    # 16-bit LoRA at the pilot's length and first seed: the reference of the destroyed rule
    # (comparison.destroyed_gap), so no verdict silently rests on a destroyed config.
    reference: str = "lora16"
    tasks: tuple = ()              # lm-eval tasks per run; the test loss is always measured
    limit: int | None = 100         # documents per task; None = the full split
    n_test: int | None = 256       # test pairs scored per run (the first n of the test split)
    memory_tolerance: float = 0.03  # every config within this fraction of the target memory
    bits: tuple = (2, 4)           # (low, high) rungs of Configs A-D; the paper's pilot: (2, 4)
    sweep_bits: tuple = (2, 3, 4)
    sweep_ranks: tuple = (4, 8, 16)


@dataclass(frozen=True)
class ComparisonConfig:
    """How claims are judged (workbook/stats.py, workbook/comparison.py)."""
    # The primary family, declared before the run: the paper's headline questions at this scale, as
    # claim ids of reference/claims.json, judged on the test loss. Holm's adjustment runs over these
    # alone; every other test-loss claim is exploratory (an unadjusted interval, labelled so), and the
    # benchmark-average rows form a family of their own.
    primary: tuple = ("qr4_vs_nf4", "qr3p5_vs_nf4", "qr4_vs_lora16", "qr4_vs_hqq4")
    claims_file: str = ""          # the claims JSON; "" = the package's reference/claims.json
    # A loss difference inside this margin is too small to choose a method by: about what two seeds of
    # one method differ by. Measured on the default's 48-step final runs (results/default, 3 seeds): a
    # method's test loss varies with the seed by SD 0.011-0.031 nats per token (median 0.018), so two
    # runs of the same method differ by about sqrt(2) x 0.018 = 0.025 (2.5% perplexity per answer token).
    margin_loss: float = 0.025
    margin_accuracy: float = 0.01  # one accuracy point (fraction), the paper's tables' resolution: a setting
    alpha: float = 0.05            # family-wise error of each family (Holm, stats.judge_family)
    power: float = 0.8             # the power the sample-size table (comparison.power) sizes designs for
    # A run this many nats per token above 16-bit LoRA's test loss (e = 2.7x its perplexity) has been
    # destroyed by its quantization: figures draw it apart, and a claim against it is marked (a setting).
    destroyed_gap: float = 1.0


@dataclass(frozen=True)
class ProxyCheckConfig:
    methods: tuple = ("hqq3", "hqq4", "qr_adaptor", "qr_adaptor_3p5", "phase1_knapsack4", "random4_0", "random4_1",
                      "random4_2", "random3p5_0", "random3p5_1", "random3p5_2")
    lengths: tuple = (0, 4, 8, 16)   # proxy steps scored
    n_val: tuple = (16, 32, 64)      # validation examples scored (the first n)
    seeds: tuple = (0, 1)            # proxy seeds per allocation
    min_spearman: float = 0.8
    # Rank agreement is also measured among the top_k allocations by final test loss: the random draws
    # sit far from the rest and make the whole-set correlation easy; the search decides near the front.
    top_k: int = 5


@dataclass(frozen=True)
class SizingConfig:
    """The learning curves that size the final fine-tune and the search's ladder (workbook/sizing.py)."""
    # Uniform settings (method ids): fidelity against plasticity at the reference rank and around it.
    methods: tuple = ("lora16", "nf4", "hqq4_r4", "hqq4", "hqq4_r16", "hqq3", "hqq3_r16", "hqq3_g32", "hqq2")
    checkpoints: tuple = (0, 12, 24, 48, 96, 192, 384)   # optimizer steps after which the dev split is scored
    seed: int = 0
    # The methods whose order decides the length (sizing.length): no pair flips between L and 2L.
    key_methods: tuple = ("lora16", "nf4", "hqq4", "hqq4_r4", "hqq3")
    # A rung "survives" when its dev loss at the last checkpoint is within this many nats of 16-bit
    # LoRA's (a setting: 0.5 nats = 1.65x the perplexity per answer token).
    max_gap: float = 0.5


@dataclass(frozen=True)
class LengthsConfig:
    """The primary claims followed across training length (workbook/lengths.py)."""
    # x the final fine-tune's pairs, one epoch each (1 = the final runs themselves). The default's 48
    # steps to 384 spans 8x: where the sizing curves show 3-bit blocks still recovering.
    factors: tuple = (1, 2, 4, 8)


@dataclass(frozen=True)
class Profile:
    name: str = "default"
    model: str = "embedded"        # "embedded", "tiny", a hub id or a local folder
    dtype: str = "auto"            # compute dtype; "auto" = fastest on this machine (hardware.py)
    device: str = "cpu"
    bit_ladder: tuple = DEFAULT_BIT_LADDER
    rank_ladder: tuple = DEFAULT_RANK_LADDER
    budget_bits: int = 4           # the memory budget is uniform budget_bits at budget_rank
    budget_rank: int = 8
    # Further budgets (average bits) selected from the same front: 3.5 is the paper's "about 3.5 bits beats
    # 4-bit QLoRA" claim, which methods/qr_adaptor_3p5.json reads.
    select_at: tuple = (3.5,)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    proxy: TrainConfig = field(default_factory=TrainConfig)
    proxy_metric: str = "loss"     # or a benchmark task: the proxy then minimizes its error rate
    proxy_metric_limit: int = 100  # documents of that task per score
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    nsga: NSGAConfig = field(default_factory=NSGAConfig)
    bo: BOConfig = field(default_factory=BOConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pilot: PilotConfig = field(default_factory=PilotConfig)
    sizing: SizingConfig = field(default_factory=SizingConfig)
    lengths: LengthsConfig = field(default_factory=LengthsConfig)
    comparison: ComparisonConfig = field(default_factory=ComparisonConfig)
    proxy_check: ProxyCheckConfig = field(default_factory=ProxyCheckConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @property
    def random_weights(self) -> bool:
        """The smoke profile's tiny model is random: its runs check the mechanics, never the paper."""
        return self.model == "tiny"


@dataclass(frozen=True)
class Domain:
    """The values a setting may take: `test` says whether a value is one, `says` names them and
    `example` gives one, for the message that refuses the rest."""
    test: Callable[[Any], bool]
    says: str
    example: str


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


POSITIVE = Domain(lambda x: _number(x) and x > 0, "a finite positive number", "4")
NON_NEGATIVE = Domain(lambda x: _number(x) and x >= 0, "a finite number >= 0", "0")
FRACTION = Domain(lambda x: _number(x) and 0 <= x < 1, "a fraction in [0, 1)", "0.05")
PROBABILITY = Domain(lambda x: _number(x) and 0 <= x <= 1, "a probability in [0, 1]", "0.5")
LEVEL = Domain(lambda x: _number(x) and 0 < x < 1, "a level strictly between 0 and 1", "0.05")
# AdamW's steps are about lr in size whatever the gradient: above 1 every weight it touches is noise.
LEARNING_RATE = Domain(lambda x: _number(x) and 0 < x <= 1, "a learning rate: a positive number at most 1", "2e-4")
SEEDS = Domain(lambda x: len(x) > 0 and all(isinstance(s, int) and s >= 0 for s in x),
               "a non-empty list of non-negative integer seeds", "[0, 1, 2]")
POSITIVE_ITEMS = Domain(lambda x: len(x) > 0 and all(_number(v) and v > 0 for v in x),
                        "a non-empty list of positive numbers", "[1, 2, 4, 8]")
POSITIVE_ITEMS_OR_NONE = Domain(lambda x: all(_number(v) and v > 0 for v in x),
                                "a list of positive numbers (empty: none)", "[4, 8, 16]")
NON_NEGATIVE_ITEMS = Domain(lambda x: len(x) > 0 and all(_number(v) and v >= 0 for v in x),
                            "a non-empty list of numbers >= 0", "[0, 8, 16]")


def one_of(*choices: str) -> Domain:
    return Domain(lambda x: x in choices, f"one of {list(choices)}", repr(choices[0]))


# The domain of every numeric or enumerated setting, checked when a profile loads (profiles.validate),
# before any work. A setting typed `X | None` may also be null; no other may.
DOMAINS: dict[str, Domain] = {
    "dtype": one_of(*DTYPES),
    "device": Domain(lambda x: re.fullmatch(r"cpu|mps|cuda(:\d+)?", x) is not None, "cpu, cuda, cuda:<n> or mps",
                     "'cpu'"),
    "proxy_metric_limit": POSITIVE,   # budget_bits and budget_rank: checked against the ladders
    **{f"data.{k}": POSITIVE for k in ("n_train", "n_val", "n_test", "n_calib", "n_heldout")},
    "data.n_dev": NON_NEGATIVE, "data.seed": NON_NEGATIVE,
    "quant.backend": one_of("hqq", "bnb"), "quant.group_size": POSITIVE,
    "lora.alpha_ratio": POSITIVE, "lora.dropout": FRACTION,
    **{f"proxy.{k}": POSITIVE for k in ("steps", "batch_size", "grad_accum", "max_len")},
    "proxy.lr": LEARNING_RATE, "proxy.warmup_steps": NON_NEGATIVE, "proxy.weight_decay": NON_NEGATIVE,
    "proxy.schedule": one_of(*SCHEDULES), "proxy.seed": NON_NEGATIVE,
    "sensitivity.bits": POSITIVE_ITEMS, "sensitivity.seq_len": POSITIVE, "sensitivity.batch_size": POSITIVE,
    "nsga.pop_size": POSITIVE, "nsga.generations": NON_NEGATIVE, "nsga.n_random": NON_NEGATIVE,
    "nsga.mutation_prob": PROBABILITY, "nsga.crossover_prob": PROBABILITY, "nsga.low_steps": NON_NEGATIVE,
    "nsga.low_n_val": POSITIVE, "nsga.promote": NON_NEGATIVE, "nsga.seed": NON_NEGATIVE,
    "bo.iterations": NON_NEGATIVE, "bo.alpha": PROBABILITY, "bo.ei_tol": NON_NEGATIVE, "bo.xi": NON_NEGATIVE,
    "bo.seed": NON_NEGATIVE,
    "limits.max_hours": POSITIVE, "limits.floor_step_seconds": POSITIVE, "limits.max_memory_gib": POSITIVE,
    "parallel.backend": one_of("serial", "dask"), "parallel.workers": POSITIVE,
    "parallel.threads_per_worker": POSITIVE, "parallel.retries": NON_NEGATIVE,
    "finetune.epochs": POSITIVE, "finetune.max_steps": POSITIVE, "finetune.batch_size": POSITIVE,
    "finetune.grad_accum": POSITIVE, "finetune.lr": LEARNING_RATE, "finetune.warmup_ratio": FRACTION,
    "finetune.schedule": one_of(*SCHEDULES), "finetune.max_len": POSITIVE, "finetune.n_test": POSITIVE,
    "finetune.seeds": SEEDS, "finetune.dev_seeds": SEEDS,
    "eval.limit": POSITIVE, "eval.batch_size": POSITIVE, "eval.max_gen_toks": POSITIVE, "eval.seeds": SEEDS,
    "pilot.steps": POSITIVE, "pilot.seeds": SEEDS, "pilot.limit": POSITIVE, "pilot.n_test": POSITIVE,
    "pilot.memory_tolerance": POSITIVE, "pilot.sweep_bits": POSITIVE_ITEMS_OR_NONE,
    "pilot.sweep_ranks": POSITIVE_ITEMS_OR_NONE,
    "comparison.margin_loss": NON_NEGATIVE, "comparison.margin_accuracy": NON_NEGATIVE, "comparison.alpha": LEVEL,
    "comparison.power": LEVEL, "comparison.destroyed_gap": POSITIVE,
    "proxy_check.lengths": NON_NEGATIVE_ITEMS, "proxy_check.n_val": POSITIVE_ITEMS, "proxy_check.seeds": SEEDS,
    "proxy_check.min_spearman": Domain(lambda x: _number(x) and -1 <= x <= 1, "a correlation in [-1, 1]", "0.8"),
    "proxy_check.top_k": POSITIVE,
    "sizing.checkpoints": NON_NEGATIVE_ITEMS, "sizing.seed": NON_NEGATIVE, "sizing.max_gap": POSITIVE,
    "lengths.factors": POSITIVE_ITEMS,
}
