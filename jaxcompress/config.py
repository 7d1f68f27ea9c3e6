"""The base config: every field a job of the library reads, with its default, one
section per job plus the shared ones (model, data, train, hardware, checkpoint).
Experiment configs (configs/*.py, benchmarks/configs/*.py) start from `get_config()`
and override fields.

Each field is declared with its default and what it allows (type, range or choices,
NaN / inf; `jaxcompress.schema`), and `RULES` relate fields to each other;
`jaxcompress.schema.validate` checks a config against both before any job runs.

Run: python -m launch.main --config=configs/default.py --workdir=/tmp/run
     --config.train.num_epochs=3
"""
import ml_collections

from jaxcompress.schema import Bool, Choice, Dict, Float, Int, Optional, Rule, Section, Str, Tuple, get

MAX_EPOCHS = 10 ** 6  # an epoch count above this is a typo (it would run for ever)
MAX_STEPS = 10 ** 9  # likewise for step, episode and iteration counts
BITS_W = tuple(range(1, 9)) + (32,)  # weight bits a layer can take (32 = float; jaxcompress.quant.policy)
BITS_A = tuple(range(2, 9)) + (32,)  # activation bits (32 = float)
STAMP_METHODS = ("stamp", "dense", "magnitude", "snip_pretrained", "snip_init", "random", "random_stamp_widths",
                 "bbdropout", "scratch")


def _model_names():
    from jaxcompress.models.registry import MODELS  # lazy: the zoo imports flax
    return sorted(MODELS)


def epochs(default: int, lo: int = 0, note: str = "") -> Int:
    return Int(default, lo=lo, hi=MAX_EPOCHS, note=note)


def steps(default: int, lo: int = 1, note: str = "") -> Int:
    return Int(default, lo=lo, hi=MAX_STEPS, note=note)


def rate(default: float, note: str = "") -> Float:
    """A learning rate: positive and finite."""
    return Float(default, lo=0.0, lo_open=True, note=note)


def fraction(default: float, lo_open: bool = False, hi_open: bool = False, zero: str | None = None,
             note: str = "") -> Float:
    return Float(default, lo=0.0, hi=1.0, lo_open=lo_open, hi_open=hi_open, zero=zero, note=note)


def nonneg(default: float, note: str = "") -> Float:
    return Float(default, lo=0.0, note=note)


def classes(default: tuple, min_len: int = 0) -> Tuple:
    return Tuple(default, of=Int(lo=0), min_len=min_len, distinct=True, note="class ids of the dataset")


IMAGE_SIZE = dict(zero="keep as stored", lo=8, hi=1024)  # smaller images leave nothing after the pooling layers
SCOPE = ("inner", "all")

SCHEMA = Section(
    job=Str("train", nonempty=True),  # train | evaluate | prune | quantize | search | stamp (jaxcompress.jobs.JOBS);
    # the benchmarks' bench_* jobs run with python -m benchmarks.run
    seed=Int(0, lo=0, hi=2 ** 31 - 1),
    # many processes, one per host (TPU VM pods, GPU clusters; jaxcompress.distributed): `enabled` connects
    # them with jax.distributed.initialize once per process; the other fields left empty are auto-detected
    # (SLURM, TPU VM, GKE), or set all three to launch by hand (process 0 serves at coordinator_address)
    distributed=Section(
        enabled=Bool(False), coordinator_address=Str("", note='host:port of process 0; "": auto-detect'),
        num_processes=Int(0, lo=0, note="0: auto-detect"), process_id=Int(-1, lo=-1, note="-1: auto-detect")),

    # settings every job shares: kept channel counts are multiples of `multiple` (None: the backend's, 8 on
    # CPU/GPU, 128 on TPU, jaxcompress.pruning.align; 1: unaligned, as in the papers), and every job's
    # summary.json has the measured forward latency at batch `latency_batch` (0: off), which latency budgets use
    hardware=Section(
        multiple=Optional(Int(lo=1), note="None: the backend's"), latency_batch=Int(128, lo=0, note="0: off")),

    model=Section(name=Choice("lenet5", _model_names),
                  width_multiplier=Float(1.0, lo=0.01, hi=16.0)),

    # data.name: digits (embedded, offline) | mnist | cifar10 | npz:<path> | tfds:<name>
    data=Section(
        name=Str("mnist", nonempty=True), data_dir=Str(""),
        image_size=Int(0, **IMAGE_SIZE), channels=Choice(0, (0, 1, 3), note="0: keep as stored"),  # 0: keep as
        # stored
        val_size=Int(5000, lo=1), classes=classes(()), augment=Bool(False),
        # > 0: stratified subsets of this many train / test examples (short budgets)
        train_size=Int(0, lo=0, note="0: every example"), test_size=Int(0, lo=0, note="0: every example"),
        # tfds datasets: read each image when a batch needs it, not the whole split at start (each process of a
        # many-host run then reads only its rows; splits larger than memory work; mean / std from 10,000
        # evenly spaced training images); digits / npz ignore it
        lazy=Bool(False)),

    # batch_size / eval_batch_size are global: over all devices and processes together (each of N processes
    # reads batch_size / N rows of every batch), so a run's numbers do not depend on how many hosts it uses
    train=Section(
        num_epochs=epochs(15, lo=1), batch_size=Int(128, lo=1), eval_batch_size=Int(1000, lo=1),
        optimizer=Choice("sgd", ("sgd", "adam", "adamw")), learning_rate=rate(0.05),
        momentum=fraction(0.9, hi_open=True), nesterov=Bool(True), weight_decay=nonneg(5e-4),
        schedule=Choice("cosine", ("constant", "cosine", "step")), warmup_epochs=Float(0.0, lo=0.0, hi=MAX_EPOCHS),
        decay_epochs=Tuple((), of=Float(lo=0.0, hi=MAX_EPOCHS)), decay_factor=Float(0.1, lo=0.0, lo_open=True),
        label_smoothing=fraction(0.0, hi_open=True),
        # knowledge distillation (Hinton et al. 2015) in the fine-tunes of the prune, quantize and search jobs:
        # loss = (1 - w) CE + w T^2 KL(teacher_T || student_T), the teacher being the job's reference network
        distill_weight=fraction(0.0, note="0: no distillation"),
        distill_temperature=rate(4.0, note="Hinton et al.: 2-8"),
        # compute dtype of the jitted train / eval steps: float32 | bfloat16 (mixed precision: float32 weights,
        # optimizer state, BatchNorm statistics and losses; forward and backward in bfloat16)
        dtype=Choice("float32", ("float32", "bfloat16")),
        prefetch=Int(2, lo=0, hi=64, note="0: off")),  # batches placed on the devices ahead of the training step

    # job "prune": criterion l1 | l2 | bn | snip | random | lasso | variational
    prune=Section(
        checkpoint=Str(""),  # a trained run's workdir (its best/ is used); "" trains one into <workdir>/pretrain
        criterion=Choice("l1", ("l1", "l2", "bn", "snip", "random", "lasso", "variational")),
        keep_ratio=fraction(0.5, lo_open=True),
        keep_ratios=Dict({}, of=fraction(None, lo_open=True)),  # keep_ratios: {group name: fraction} overrides
        allocation=Choice("uniform", ("uniform", "global", "latency")),  # uniform | global (one threshold over
        # normalised scores) | latency (with flops_budget: per-group widths that this device's measured latency
        # table rates fastest within the budget, jaxcompress.pruning.allocate)
        scope=Choice("inner", SCOPE),  # inner: leave residual streams whole | all
        element_rate=fraction(0.0, hi_open=True),
        element_rates=Dict({}, of=fraction(None, hi_open=True)),  # then magnitude-prune this fraction of each
        # layer's weights (element_rates: {layer path: fraction} overrides)
        iterations=Int(1, lo=1, hi=1000), iteration_epochs=epochs(2),  # gradual pruning: steps, masked fine-tune
        # epochs between
        sample_size=Int(256, lo=1),  # training images for snip / lasso
        # criterion "variational": noise training (channel rate = 1 - keep_ratio; spatial_rate prunes kh x kw taps)
        variational=Section(spatial_rate=fraction(0.0, hi_open=True), num_steps=steps(500, lo=0),
                            beta=nonneg(1.0), learning_rate=nonneg(0.01, note="0: weights frozen"),
                            noise_learning_rate=rate(0.01), batch_size=Int(128, lo=1),
                            include_dense=Bool(False),
                            init_alpha=Float(0.05, lo=0.001, hi=0.701, lo_open=True, hi_open=True,
                                             note="information dropout's alpha range")),
        finetune_epochs=epochs(5), finetune_learning_rate=rate(0.01),
        # budgets (at most one; 0: keep_ratio as given) set the largest uniform keep_ratio whose aligned widths
        # meet them: a fraction of the dense FLOPs, or of the dense latency on this device (jaxcompress.latency,
        # measured at hardware.latency_batch and cached)
        flops_budget=fraction(0.0, lo_open=True, zero="none"),
        latency_budget=fraction(0.0, lo_open=True, zero="none")),

    # job "quantize" (jaxcompress.quant.job): PTQ or QAT, then packed export + checks
    quant=Section(
        mode=Choice("ptq", ("ptq", "qat")),  # ptq (calibrate only) | qat (then train with the STE for qat_epochs)
        checkpoint=Str(""),  # a trained run's workdir (its best/); "" trains one into <workdir>/pretrain
        train_if_missing=Bool(False),  # checkpoint given but not there: train it there first
        pruned_checkpoint=Str(""),  # a prune job's workdir: quantize its shrunk, fine-tuned network
        prune_first=Bool(False),  # run the prune job (config.prune) into <workdir>/prune, then quantize
        bits_w=Choice(8, BITS_W), bits_a=Choice(8, BITS_A),  # uniform bits: weights 1..8, activations 2..8;
        # 32 = float
        layer_bits_w=Dict({}, of=Choice(None, BITS_W)),
        layer_bits_a=Dict({}, of=Choice(None, BITS_A)),  # {layer path: bits} overrides
        policy=Str(""),  # a policy JSON (format jaxcompress.quant_policy/1), e.g. written by the RL search
        scheme=Choice("symmetric", ("symmetric", "asymmetric", "kmeans")),  # symmetric | asymmetric | kmeans
        # (weight sharing, one codebook per layer)
        granularity=Choice("channel", ("channel", "tensor")),  # channel | tensor (scales of the uniform schemes)
        kmeans_iters=Int(20, lo=1, hi=10 ** 6),
        calibration=Choice("minmax", ("minmax", "percentile", "mse")),  # minmax | percentile | mse (activation
        # clip ranges, range_a)
        percentile=Float(99.99, lo=0.0, hi=100.0, lo_open=True),
        calib_batches=Int(4, lo=1, note="with 0 the calibration data is empty"),
        calib_batch_size=Int(256, lo=1, note="with 0 the calibration data is empty"),
        # budgets (at most one): bytes, fraction of the original float32 bytes, bytes of the network at a
        # uniform width, or BitOps; met by lowering bits (HAQ) or by the sensitivity heuristic
        budget_bytes=Int(0, lo=0, note="0: none"), budget_ratio=fraction(0.0, note="0: none"),
        budget_uniform_bits=Choice(0, (0,) + BITS_W, note="0: none"), budget_bitops=nonneg(0.0, note="0: none"),
        allocation=Choice("uniform", ("uniform", "sensitivity")),  # uniform (HAQ order: last layer back) |
        # sensitivity
        min_bits_w=Choice(2, BITS_W), first_last_min_bits=Choice(8, BITS_W),
        sensitivity_bits=Tuple((2, 3, 4, 5, 6, 7, 8), of=Choice(None, tuple(range(1, 9))), min_len=1,
                               distinct=True),
        sensitivity_examples=Int(1000, lo=1),
        qat_epochs=epochs(3), qat_learning_rate=rate(0.01),
        index_bits_conv=Int(8, lo=1, hi=16),
        index_bits_dense=Int(5, lo=1, hi=16),  # CSR relative-index bits (Deep Compression)
        verify_batch=Int(256, lo=1),  # test images on which the loaded model must equal the fake-quant one
        integer_check=Bool(True)),  # also run the network in integers on the whole test split and time it
        # (int8 x int8 -> int32, jaxcompress.quant.integer: accuracy_integer, latency_integer_s); False: skip

    # job "search" (jaxcompress.rl.job): two-stage RL search (pruning rates, then bits), Zhan et al. 2021
    search=Section(
        checkpoint=Str(""),  # a trained run's workdir (its best/); "" trains one into <workdir>/pretrain
        agent=Choice("ppo", ("ppo", "ddpg", "random")),  # ppo (the paper's) | ddpg (AMC / HAQ baseline) |
        # random (random search: uniform actions, walled alike; jaxcompress.rl.random_search)
        num_actors=Int(16, lo=1, hi=65536),  # parallel actors: one jitted iteration = num_actors episodes +
        # evaluations + update
        episodes=steps(400),  # stage-1 episodes (rounded up to a multiple of num_actors)
        flops_budget=fraction(0.5, lo_open=True),  # fraction of the dense FLOPs (AMC action wall)
        params_budget=fraction(0.0, note="0: none"),  # optional fraction of the dense parameters, walled like
        # FLOPs (0: none)
        latency_budget=fraction(0.0, lo_open=True, zero="none"),  # optional fraction of the dense latency on
        # this device (jaxcompress.latency; 0: none)
        a_min=fraction(0.0, hi_open=True), a_max=fraction(0.8, hi_open=True),  # pruning-rate bounds per group
        scope=Choice("inner", SCOPE),  # groups searched: inner (residual streams left whole) | all
        reward=Choice("acc", ("acc", "flops", "log_flops")),  # acc (R_acc) | flops (R_FLOPs) | log_flops (AMC);
        # see jaxcompress.rl.search
        cost_norm=Choice("bounds", ("bounds", "observed")),  # R_FLOPs's F_min/F_max: bounds (reachable range) |
        # observed (so far)
        rank_criterion=Choice("l1", ("l1", "l2", "bn")),  # channel ranking used inside the search (magnitude:
        # fast, in-graph); must equal scheme when that is l1 | l2 | bn
        eval_size=Int(1000, lo=1),  # validation images each candidate is evaluated on (fixed sample; never test)
        rerank_top_k=Int(8, lo=0, note="0: off"),  # the top-k distinct stage-1 candidates re-scored on split B,
        # the best there applied (EagleEye; jaxcompress.rl.rerank; 0: off, the best on the eval_size sample)
        rerank_size=Int(2000, lo=1),  # split B: validation images disjoint from the eval_size sample
        # then the top few on split B each take select_finetune_steps SGD steps (candidate_finetune_batch /
        # _lr) and are scored on split B again; the best after that is applied (EagleEye; 0: off)
        select_finetune_top=Int(3, lo=0, note="0: off"), select_finetune_steps=steps(50, lo=1),
        eval_mode=Choice("stacked", ("stacked", "vmap")),  # stacked (shared weights, actors stacked on the
        # batch) | vmap
        eval_chunk=Int(0, lo=0, note="0: all"),  # actors evaluated at once (0: all)
        bn_adapt=Bool(True),  # BatchNorm on each candidate's own statistics over the eval images (EagleEye);
        # False: running
        candidate_finetune_steps=steps(0, lo=0),  # > 0: each candidate takes this many SGD steps before
        # evaluation (slow)
        candidate_finetune_batch=Int(64, lo=1), candidate_finetune_lr=rate(0.01),
        granularity=Choice("channel", ("channel", "element")),  # stage 1 searches: channel (kept channels per
        # group) | element (magnitude element rates per conv / dense layer, sparse FLOPs; the paper's LeNet-5
        # row); see jaxcompress.rl.env
        element_iterations=Int(1, lo=1, hi=1000),
        element_iteration_epochs=epochs(1),  # element policy applied gradually: steps, epochs between
        scheme=Choice("l1", ("l1", "l2", "bn", "lasso", "variational")),  # channel selection applying the best
        # policy: l1 | l2 | bn | lasso | variational
        finetune_epochs=epochs(5), finetune_learning_rate=rate(0.01),
        report_budgets=Tuple((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                             of=fraction(None, lo_open=True)),  # best policy per FLOPs budget
        checkpoint_every=steps(10), log_every=steps(10),  # iterations
        quant=Section(
            episodes=steps(0, lo=0, note="0 skips stage 2"),  # stage-2 episodes; 0 skips stage 2
            agent=Choice("", ("", "ppo", "ddpg", "random"), note='"": search.agent'),  # "" = search.agent
            b_min=Int(2, lo=1, hi=8), b_max=Int(8, lo=1, hi=8),  # weight bits per layer
            bits_budget=Float(5.0, lo=1.0, hi=32.0),  # average weight bits (HAQ back-off)
            bits_a=Int(8, lo=2, hi=8, zero="float"),  # activation bits during the search and QAT (0 = float)
            eval_chunk=Int(0, lo=0, note="0: 1 on CPU, all elsewhere"),  # actors evaluated at once (0: 1 on CPU,
            # all elsewhere)
            qat_epochs=epochs(3), qat_learning_rate=rate(0.005)),
        ppo=Section(
            hidden=Int(64, lo=1, hi=65536), actor_lr=rate(3e-3), critic_lr=rate(1e-2),
            clip=fraction(0.2, lo_open=True), epochs=Int(4, lo=1, hi=10 ** 4),
            critic_epochs=Int(32, lo=1, hi=10 ** 4), tau=fraction(0.05, lo_open=True),
            target_noise=nonneg(0.1), noise_clip=nonneg(0.25), discount=fraction(1.0), entropy_coef=nonneg(0.0),
            init_std=rate(1.0),
            policy=Choice("gaussian", ("gaussian", "beta")),  # gaussian (sigmoid-squashed) | beta
            critic_target=Choice("mix", ("mix", "td", "return")),
            return_weight=fraction(0.5),  # critic y = w * return + (1 - w) * TD3 target (mix | td | return)
            advantage=Choice("q", ("q", "return")),
            baseline=Choice("state", ("state", "mean")),  # A = normalised Q(s,a) - Q(s,mu(s)) (q | return;
            # state | mean)
            normalize_advantages=Bool(True)),  # A / its batch standard deviation (False: centred only)
        ddpg=Section(
            hidden=Int(300, lo=1, hi=65536), actor_lr=rate(1e-4), critic_lr=rate(1e-3),
            tau=fraction(0.01, lo_open=True), discount=fraction(1.0), batch_size=Int(64, lo=1),
            warmup_episodes=steps(100, lo=0), sigma=nonneg(0.5), sigma_decay=fraction(0.95, lo_open=True),
            buffer_size=Int(2000, lo=1), moving_alpha=fraction(0.5),
            updates_per_episode=Int(0, lo=0, hi=10 ** 6, note="0: one per step of the episode"))),

    # job "stamp" (jaxcompress.stamp.job): reference pretraining on config.data restricted to
    # reference_classes, meta-training of the set encoder + mask generator, then STAMP and the
    # baselines on stamp.target (same fine-tune epochs, same final size)
    stamp=Section(
        reference_classes=classes((0, 1, 2, 3, 4), min_len=1),
        reference_train_size=Int(0, lo=0, note="0: every example"),  # 0: every reference training example
        target=Section(name=Str(""), data_dir=Str(""), image_size=Int(0, **IMAGE_SIZE),
                       channels=Choice(0, (0, 1, 3)),  # ""/0: config.data's
                       classes=classes((5, 6, 7, 8, 9))),
        target_train_size=Int(0, lo=0, note="0: every example"), val_size=Int(500, lo=1),
        allow_overlap=Bool(False),
        head_classes=Int(0, lo=0, note="0: one per reference class"),  # classifier outputs; 0: number of
        # reference classes
        pretrained=Str(""),  # a reference run's workdir (its best/); "" trains one into <workdir>/pretrain
        meta_checkpoint=Str(""),  # a meta-training dir; "" meta-trains into <workdir>/meta (resumable)
        scope=Choice("all", ("all", "inner")),  # prunable channel groups: all | inner
        budget=fraction(0.3, lo_open=True),
        budget_metric=Choice("params", ("params", "flops")),  # params | flops fraction the deployed net must meet
        budget_weight=nonneg(5.0),
        budget_penalty=Choice("target", ("target", "hinge", "counts")),  # target: |E[fraction] - budget| |
        # hinge: relu(E - budget) | counts (selection=per_layer): each group's sum of E[pi] at its count
        kl_weight=nonneg(1.0), prior_alpha=rate(1e-4), a_init=Float(2.0), temperature=rate(0.1),
        selection=Choice("global", ("global", "per_layer")),  # global: widths from the global ranking of
        # E[pi] (mask_mode) | per_layer: each group keeps its uniform-widths count at the budget (the baselines'
        # widths), the highest E[pi] at deployment, a straight-through top-k of the gates in meta-training
        channel_stats=Bool(False),  # the generator also reads per-channel statistics of the target sample
        diagnostic_sets=Int(8, lo=0, hi=1000, note="0: no diagnostics"),  # target sets for E[pi]'s variation
        mask_mode=Choice("budget", ("budget", "threshold")),
        threshold=fraction(1e-3),  # budget: top E[pi] meeting the budget | threshold: E[pi] >= t
        instance=Choice("pretrained", ("pretrained", "stem")),
        feature_convs=Int(2, lo=1, hi=16),  # pretrained: features of the first convs | stem
        pooling=Choice("pma", ("pma", "mean")), embed_dim=Int(64, lo=1, hi=4096), num_heads=Int(4, lo=1, hi=64),
        set_size=Int(100, lo=1),
        algorithm=Choice("fomaml", ("fomaml", "maml", "reptile")),  # fomaml | maml | reptile
        meta_steps=steps(200, lo=0), tasks_per_step=Int(4, lo=1, hi=4096), meta_learning_rate=rate(1e-3),
        task_ways=Tuple((), of=Int(lo=1), lengths=(0, 2),
                        shape="() (every reference class) or a pair (fewest, most) of ways"),  # (): all
        # reference classes
        inner_steps=Int(5, lo=0, hi=10 ** 4), inner_batch=Int(32, lo=1), inner_lr=rate(0.01),
        query_size=Int(64, lo=1), reptile_lr=rate(0.01), meta_weights=Bool(False),
        meta_val_size=Int(0, lo=0, note="0: no validation, the last meta-checkpoint is deployed"),  # reference
        # training examples held out of meta-training; tasks on them pick the meta-checkpoint deployed
        meta_val_tasks=Int(16, lo=1, hi=4096),
        checkpoint_every=steps(50),
        methods=Tuple(STAMP_METHODS, of=Choice(None, STAMP_METHODS), min_len=1, distinct=True),
        baseline_widths=Choice("uniform", ("uniform", "stamp")),  # uniform: each criterion at a uniform ratio
        # of STAMP's size | stamp: its widths
        finetune_epochs=epochs(5), finetune_learning_rate=rate(0.01), scratch_learning_rate=rate(0.05),
        bbdropout_epochs=epochs(5), snip_batch=Int(256, lo=1)),

    checkpoint=Section(every_steps=Int(0, lo=0, note="0: at epoch ends only"),
                       max_to_keep=Int(2, lo=1, note="0 would disable resume")),
    eval=Section(checkpoint=Str("best", nonempty=True)),  # best | last | <directory>
)

# relations between fields, and the files they name (those needing data or devices stay with the jobs)
QUANT_BUDGETS = ("budget_bytes", "budget_ratio", "budget_uniform_bits", "budget_bitops")


def _one_quant_budget(name: str) -> Rule:
    earlier = QUANT_BUDGETS[:QUANT_BUDGETS.index(name)]
    return Rule(f"quant.{name}", f"0 when quant.{' or quant.'.join(earlier)} is set (give at most one quant budget)",
                lambda c: not (c.quant[name] and any(c.quant[k] for k in earlier)),
                others=tuple(f"quant.{k}" for k in earlier))


def exists(path: str, kind: str = "dir"):
    """A rule's condition: the config's `path` field is empty, or names an existing
    directory (`kind="file"`: file), local or remote (etils.epath: gs://, ...)."""
    def ok(c) -> bool:
        from etils import epath  # lazy: the schema is checked before heavy imports
        value = get(c, path)
        if not value:
            return True
        p = epath.Path(value)
        try:
            return p.is_dir() if kind == "dir" else p.is_file()
        except Exception:  # an unreachable remote path  # noqa: BLE001
            return False
    return ok


BUILTIN_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10}  # the built-in datasets' class counts


def _classes_of(field: str, dataset):
    """A rule: the class ids at `field` exist in the built-in dataset `dataset(config)`
    (known before loading it; npz / tfds class lists are checked when loaded)."""
    return Rule(field, lambda c: f"class ids of {dataset(c)}, 0..{BUILTIN_CLASSES[dataset(c)] - 1}",
                lambda c: all(k < BUILTIN_CLASSES[dataset(c)] for k in get(c, field)),
                when=lambda c: dataset(c) in BUILTIN_CLASSES)


def _address_ok(address: str) -> bool:
    host, sep, port = address.strip().rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


_CONNECTION = ("distributed.coordinator_address", "distributed.num_processes", "distributed.process_id")
_MANUAL = lambda c: bool(c.distributed.coordinator_address)  # noqa: E731 - launched by hand: all three given


def _global_batch(name: str) -> Rule:
    return Rule(f"train.{name}", "a multiple of distributed.num_processes={distributed.num_processes} (the global "
                "batch, split evenly over the processes)",
                lambda c: c.train[name] % c.distributed.num_processes == 0, others=("distributed.num_processes",),
                when=lambda c: c.distributed.num_processes > 0)


RULES = (
    Rule("distributed.enabled", "True when distributed.coordinator_address, num_processes or process_id is set",
         lambda c: c.distributed.enabled or not (c.distributed.coordinator_address or c.distributed.num_processes
                                                 or c.distributed.process_id >= 0), others=_CONNECTION),
    Rule("distributed.coordinator_address", "host:port, the address process 0 serves at",
         lambda c: _address_ok(c.distributed.coordinator_address), when=_MANUAL),
    Rule("distributed.coordinator_address", "set (host:port of process 0) with distributed.num_processes and "
         "process_id; or leave all three empty to auto-detect them (SLURM, TPU VM, GKE)",
         lambda c: bool(c.distributed.coordinator_address), others=_CONNECTION[1:],
         when=lambda c: c.distributed.num_processes > 0 or c.distributed.process_id >= 0),
    Rule("distributed.num_processes", "the number of processes (>= 1) with distributed.coordinator_address set",
         lambda c: c.distributed.num_processes >= 1, others=_CONNECTION[:1], when=_MANUAL),
    Rule("distributed.process_id", "this process's index, in 0..distributed.num_processes-1 "
         "(distributed.num_processes={distributed.num_processes})",
         lambda c: 0 <= c.distributed.process_id < c.distributed.num_processes, others=_CONNECTION[:2],
         when=lambda c: _MANUAL(c) and c.distributed.num_processes >= 1),
    _global_batch("batch_size"), _global_batch("eval_batch_size"),
    Rule("train.warmup_epochs", "below train.num_epochs={train.num_epochs}",
         lambda c: c.train.warmup_epochs < c.train.num_epochs, others=("train.num_epochs",)),
    Rule("stamp.num_heads", "a divisor of stamp.embed_dim={stamp.embed_dim} (the attention heads split it)",
         lambda c: c.stamp.embed_dim % c.stamp.num_heads == 0, others=("stamp.embed_dim",),
         when=lambda c: c.stamp.pooling == "pma"),
    Rule("stamp.budget_penalty", "target or hinge unless stamp.selection=per_layer (counts holds each group at "
         "its per-layer count)", lambda c: c.stamp.budget_penalty != "counts" or c.stamp.selection == "per_layer",
         others=("stamp.selection",)),
    Rule("stamp.task_ways", lambda c: f"a pair (fewest, most) with fewest <= most <= "
         f"{len(c.stamp.reference_classes)}, the number of stamp.reference_classes",
         lambda c: c.stamp.task_ways[0] <= c.stamp.task_ways[1] <= len(c.stamp.reference_classes),
         others=("stamp.reference_classes",), when=lambda c: len(c.stamp.task_ways) == 2),
    Rule("search.a_min", "<= search.a_max={search.a_max} (the lower pruning-rate bound)",
         lambda c: c.search.a_min <= c.search.a_max, others=("search.a_max",)),
    Rule("search.quant.b_min", "<= search.quant.b_max={search.quant.b_max}",
         lambda c: c.search.quant.b_min <= c.search.quant.b_max, others=("search.quant.b_max",)),
    Rule("search.quant.bits_budget", ">= search.quant.b_min={search.quant.b_min} (every layer uses at least "
         "b_min bits)", lambda c: c.search.quant.bits_budget >= c.search.quant.b_min,
         others=("search.quant.b_min",), when=lambda c: c.search.quant.episodes > 0),
    Rule("prune.latency_budget", "0 when prune.flops_budget is set (at most one prune budget)",
         lambda c: not (c.prune.flops_budget and c.prune.latency_budget), others=("prune.flops_budget",)),
    Rule("quant.prune_first", "False when quant.pruned_checkpoint is set (quantize a pruned network or prune "
         "here first, not both)", lambda c: not (c.quant.pruned_checkpoint and c.quant.prune_first),
         others=("quant.pruned_checkpoint",)),
    Rule("quant.qat_epochs", ">= 1 for quant.mode=qat", lambda c: c.quant.qat_epochs >= 1,
         others=("quant.mode",), when=lambda c: c.quant.mode == "qat"),
    *(_one_quant_budget(name) for name in QUANT_BUDGETS[1:]),
    _classes_of("data.classes", lambda c: c.data.name),
    _classes_of("stamp.reference_classes", lambda c: c.data.name),
    _classes_of("stamp.target.classes", lambda c: c.stamp.target.name or c.data.name),
    Rule("quant.allocation", "uniform unless a size budget is set (quant.budget_bytes, budget_ratio or "
         "budget_uniform_bits): sensitivity allocation spends one", lambda c: c.quant.allocation != "sensitivity"
         or bool(c.quant.budget_bytes or c.quant.budget_ratio or c.quant.budget_uniform_bits),
         others=("quant.budget_ratio",)),
    Rule("prune.keep_ratios", "empty with prune.allocation=uniform or latency when a prune budget is set (a "
         "budget sets the keep ratios)", lambda c: not c.prune.keep_ratios and c.prune.allocation != "global",
         others=("prune.allocation", "prune.flops_budget", "prune.latency_budget"),
         when=lambda c: bool(c.prune.flops_budget or c.prune.latency_budget)),
    Rule("prune.allocation", "uniform or global unless prune.flops_budget is set (latency allocation spends a "
         "FLOPs budget) and hardware.latency_batch > 0 (it measures latency at that batch)",
         lambda c: bool(c.prune.flops_budget) and c.hardware.latency_batch > 0,
         others=("prune.flops_budget", "hardware.latency_batch"), when=lambda c: c.prune.allocation == "latency"),
    Rule("prune.iterations", "1 for prune.criterion={prune.criterion} (gradual pruning needs a score criterion: "
         "l1, l2, bn, snip or random)", lambda c: c.prune.iterations == 1, others=("prune.criterion",),
         when=lambda c: c.prune.criterion in ("lasso", "variational")),
    *(Rule(f"{job}.latency_budget", "0 when hardware.latency_batch=0 (the latency is measured at that batch)",
           lambda c, job=job: not c[job].latency_budget, others=("hardware.latency_batch",),
           when=lambda c: c.hardware.latency_batch == 0) for job in ("prune", "search")),
    Rule("search.rank_criterion", "search.scheme={search.scheme} (candidates are scored with the channel "
         "criterion the chosen policy is then pruned with)", lambda c: c.search.rank_criterion == c.search.scheme,
         others=("search.scheme",), when=lambda c: c.search.scheme in ("l1", "l2", "bn")),
    Rule("search.granularity", "channel for search.latency_budget or search.scheme=lasso / variational (element "
         "search prunes weights by magnitude, with no latency model)", lambda c: c.search.granularity == "channel",
         others=("search.latency_budget", "search.scheme"),
         when=lambda c: bool(c.search.latency_budget) or c.search.scheme in ("lasso", "variational")),
    Rule("stamp.target.classes", lambda c: f"disjoint from stamp.reference_classes="
         f"{tuple(c.stamp.reference_classes)} on the same dataset (or set stamp.allow_overlap=True)",
         lambda c: bool(c.stamp.target.classes) and not set(c.stamp.target.classes) & set(c.stamp.reference_classes),
         others=("stamp.reference_classes", "stamp.allow_overlap"),
         when=lambda c: c.job == "stamp" and not c.stamp.allow_overlap
         and (c.stamp.target.name or c.data.name) == c.data.name),
    Rule("stamp.target.classes", lambda c: f"at most {c.stamp.head_classes or len(c.stamp.reference_classes)} "
         f"class(es), the network head's outputs", lambda c: len(c.stamp.target.classes)
         <= (c.stamp.head_classes or len(c.stamp.reference_classes)),
         others=("stamp.head_classes", "stamp.reference_classes")),
    # files and directories a job reads: there before it starts (trains, loads data, ...)
    *(Rule(path, "an existing directory (a trained run's --workdir), or empty", exists(path),
           when=lambda c, jobs=jobs: c.job in jobs) for path, jobs in (
        ("prune.checkpoint", ("prune", "quantize")), ("search.checkpoint", ("search",)),
        ("quant.pruned_checkpoint", ("quantize",)), ("stamp.pretrained", ("stamp",)))),
    Rule("quant.checkpoint", "an existing directory (a trained run's --workdir), or empty, or set "
         "quant.train_if_missing=True to train it there", exists("quant.checkpoint"), others=(
             "quant.train_if_missing",), when=lambda c: c.job == "quantize" and not c.quant.train_if_missing),
    Rule("stamp.meta_checkpoint", "an existing meta-training directory (an earlier stamp run's <workdir>/meta), "
         "or empty to meta-train into <workdir>/meta", exists("stamp.meta_checkpoint"),
         when=lambda c: c.job == "stamp"),
    Rule("quant.policy", "an existing policy JSON file (e.g. a search's policy.json), or empty",
         exists("quant.policy", kind="file")),
)


def get_config() -> ml_collections.ConfigDict:
    return SCHEMA.build()
