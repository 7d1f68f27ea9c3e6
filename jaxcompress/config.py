"""The base config: every field a job of the library reads, with its default, one
section per job plus the shared ones (model, data, train, hardware, checkpoint).
Experiment configs (configs/*.py, benchmarks/configs/*.py) start from `get_config()`
and override fields.

Run: python -m launch.main --config=configs/default.py --workdir=/tmp/run
     --config.train.num_epochs=3
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "train"  # train | evaluate | prune | quantize | search | stamp (jaxcompress.jobs.JOBS);
    # the benchmarks' bench_* jobs run with python -m benchmarks.run
    c.seed = 0
    c.multihost = False  # call jax.distributed.initialize() first (multi-host GPU/TPU)

    # settings every job shares: kept channel counts are multiples of `multiple` (None: the backend's, 8 on
    # CPU/GPU, 128 on TPU, jaxcompress.pruning.align; 1: unaligned, as in the papers), and every job's
    # summary.json has the measured forward latency at batch `latency_batch` (0: off), which latency budgets use
    c.hardware = ml_collections.ConfigDict(dict(
        multiple=ml_collections.config_dict.placeholder(int), latency_batch=128))

    c.model = ml_collections.ConfigDict(dict(name="lenet5", width_multiplier=1.0))

    # data.name: digits (embedded, offline) | mnist | cifar10 | npz:<path> | tfds:<name>
    c.data = ml_collections.ConfigDict(dict(
        name="mnist", data_dir="", image_size=0, channels=0,  # 0: keep as stored
        val_size=5000, classes=(), augment=False,
        train_size=0, test_size=0))  # > 0: stratified subsets of this many train / test examples (short budgets)

    c.train = ml_collections.ConfigDict(dict(
        num_epochs=15, batch_size=128, eval_batch_size=1000,
        optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
        schedule="cosine", warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1, label_smoothing=0.0,
        # knowledge distillation (Hinton et al. 2015) in the fine-tunes of the prune, quantize and search jobs:
        # loss = (1 - w) CE + w T^2 KL(teacher_T || student_T), the teacher being the job's reference network
        distill_weight=0.0, distill_temperature=4.0))

    # job "prune": criterion l1 | l2 | bn | snip | random | lasso | variational
    c.prune = ml_collections.ConfigDict(dict(
        checkpoint="",  # a trained run's workdir (its best/ is used); "" trains one into <workdir>/pretrain
        criterion="l1", keep_ratio=0.5, keep_ratios={},  # keep_ratios: {group name: fraction} overrides
        allocation="uniform",  # uniform | global (one threshold over normalised scores)
        scope="inner",  # inner: leave residual streams whole | all
        element_rate=0.0, element_rates={},  # then magnitude-prune this fraction of each layer's weights
        # (element_rates: {layer path: fraction} overrides)
        iterations=1, iteration_epochs=2,  # gradual pruning: steps, masked fine-tune epochs between
        sample_size=256,  # training images for snip / lasso
        # criterion "variational": noise training (channel rate = 1 - keep_ratio; spatial_rate prunes kh x kw taps)
        variational=dict(spatial_rate=0.0, num_steps=500, beta=1.0, learning_rate=0.01, noise_learning_rate=0.01,
                         batch_size=128, include_dense=False, init_alpha=0.05),
        finetune_epochs=5, finetune_learning_rate=0.01,
        # budgets (at most one; 0: keep_ratio as given) set the largest uniform keep_ratio whose aligned widths
        # meet them: a fraction of the dense FLOPs, or of the dense latency on this device (jaxcompress.latency,
        # measured at hardware.latency_batch and cached)
        flops_budget=0.0, latency_budget=0.0))

    # job "quantize" (jaxcompress.quant.job): PTQ or QAT, then packed export + checks
    c.quant = ml_collections.ConfigDict(dict(
        mode="ptq",  # ptq (calibrate only) | qat (then train with the STE for qat_epochs)
        checkpoint="",  # a trained run's workdir (its best/); "" trains one into <workdir>/pretrain
        train_if_missing=False,  # checkpoint given but not there: train it there first
        pruned_checkpoint="",  # a prune job's workdir: quantize its shrunk, fine-tuned network
        prune_first=False,  # run the prune job (config.prune) into <workdir>/prune, then quantize
        bits_w=8, bits_a=8,  # uniform bits: weights 1..8, activations 2..8; 32 = float
        layer_bits_w={}, layer_bits_a={},  # {layer path: bits} overrides
        policy="",  # a policy JSON (format jaxcompress.quant_policy/1), e.g. written by the RL search
        scheme="symmetric",  # symmetric | asymmetric | kmeans (weight sharing, one codebook per layer)
        granularity="channel",  # channel | tensor (scales of the uniform schemes)
        kmeans_iters=20,
        calibration="minmax",  # minmax | percentile | mse (activation clip ranges, range_a)
        percentile=99.99, calib_batches=4, calib_batch_size=256,
        # budgets (at most one): bytes, fraction of the original float32 bytes, bytes of the network at a
        # uniform width, or BitOps; met by lowering bits (HAQ) or by the sensitivity heuristic
        budget_bytes=0, budget_ratio=0.0, budget_uniform_bits=0, budget_bitops=0.0,
        allocation="uniform",  # uniform (HAQ order: last layer back) | sensitivity
        min_bits_w=2, first_last_min_bits=8,
        sensitivity_bits=(2, 3, 4, 5, 6, 7, 8), sensitivity_examples=1000,
        qat_epochs=3, qat_learning_rate=0.01,
        index_bits_conv=8, index_bits_dense=5,  # CSR relative-index bits (Deep Compression)
        verify_batch=256))  # test images on which the loaded model must equal the fake-quant one

    # job "search" (jaxcompress.rl.job): two-stage RL search (pruning rates, then bits), Zhan et al. 2021
    c.search = ml_collections.ConfigDict(dict(
        checkpoint="",  # a trained run's workdir (its best/); "" trains one into <workdir>/pretrain
        agent="ppo",  # ppo (the paper's) | ddpg (AMC / HAQ baseline)
        num_actors=16,  # parallel actors: one jitted iteration = num_actors episodes + evaluations + update
        episodes=400,  # stage-1 episodes (rounded up to a multiple of num_actors)
        flops_budget=0.5,  # fraction of the dense FLOPs (AMC action wall)
        params_budget=0.0,  # optional fraction of the dense parameters, walled like FLOPs (0: none)
        latency_budget=0.0,  # optional fraction of the dense latency on this device (jaxcompress.latency; 0: none)
        a_min=0.0, a_max=0.8,  # pruning-rate bounds per group
        scope="inner",  # groups searched: inner (residual streams left whole) | all
        reward="acc",  # acc (R_acc) | flops (R_FLOPs) | log_flops (AMC); see jaxcompress.rl.search
        cost_norm="bounds",  # R_FLOPs's F_min/F_max: bounds (reachable range) | observed (so far)
        rank_criterion="l1",  # channel ranking used inside the search (magnitude: fast, in-graph)
        eval_size=1000,  # validation images each candidate is evaluated on (fixed sample; never test)
        eval_mode="stacked",  # stacked (shared weights, actors stacked on the batch) | vmap
        eval_chunk=0,  # actors evaluated at once (0: all)
        bn_adapt=True,  # BatchNorm on each candidate's own statistics over the eval images (EagleEye); False: running
        candidate_finetune_steps=0,  # > 0: each candidate takes this many SGD steps before evaluation (slow)
        candidate_finetune_batch=64, candidate_finetune_lr=0.01,
        granularity="channel",  # stage 1 searches: channel (kept channels per group) | element (magnitude
        # element rates per conv / dense layer, sparse FLOPs; the paper's LeNet-5 row); see jaxcompress.rl.env
        element_iterations=1, element_iteration_epochs=1,  # element policy applied gradually: steps, epochs between
        scheme="l1",  # channel selection applying the best policy: l1 | l2 | bn | lasso | variational
        finetune_epochs=5, finetune_learning_rate=0.01,
        report_budgets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),  # best policy per FLOPs budget
        checkpoint_every=10, log_every=10,  # iterations
        quant=ml_collections.ConfigDict(dict(
            episodes=0,  # stage-2 episodes; 0 skips stage 2
            agent="",  # "" = search.agent
            b_min=2, b_max=8,  # weight bits per layer
            bits_budget=5.0,  # average weight bits (HAQ back-off)
            bits_a=8,  # activation bits during the search and QAT (0 = float)
            eval_chunk=0,  # actors evaluated at once (0: 1 on CPU, all elsewhere)
            qat_epochs=3, qat_learning_rate=0.005)),
        ppo=ml_collections.ConfigDict(dict(
            hidden=64, actor_lr=3e-3, critic_lr=1e-2, clip=0.2, epochs=4, critic_epochs=32, tau=0.05,
            target_noise=0.1, noise_clip=0.25, discount=1.0, entropy_coef=0.0, init_std=1.0,
            policy="gaussian",  # gaussian (sigmoid-squashed) | beta
            critic_target="mix", return_weight=0.5,  # critic y = w * return + (1 - w) * TD3 target (mix | td | return)
            advantage="q", baseline="state")),  # A = normalised Q(s,a) - Q(s,mu(s)) (q | return; state | mean)
        ddpg=ml_collections.ConfigDict(dict(
            hidden=300, actor_lr=1e-4, critic_lr=1e-3, tau=0.01, discount=1.0, batch_size=64,
            warmup_episodes=100, sigma=0.5, sigma_decay=0.95, buffer_size=2000, moving_alpha=0.5,
            updates_per_episode=0))))

    # job "stamp" (jaxcompress.stamp.job): reference pretraining on config.data restricted to
    # reference_classes, meta-training of the set encoder + mask generator, then STAMP and the
    # baselines on stamp.target (same fine-tune epochs, same final size)
    c.stamp = ml_collections.ConfigDict(dict(
        reference_classes=(0, 1, 2, 3, 4), reference_train_size=0,  # 0: every reference training example
        target=ml_collections.ConfigDict(dict(name="", data_dir="", image_size=0, channels=0,  # ""/0: config.data's
                                              classes=(5, 6, 7, 8, 9))),
        target_train_size=0, val_size=500, allow_overlap=False,
        head_classes=0,  # classifier outputs; 0: number of reference classes
        pretrained="",  # a reference run's workdir (its best/); "" trains one into <workdir>/pretrain
        meta_checkpoint="",  # a meta-training dir; "" meta-trains into <workdir>/meta (resumable)
        scope="all",  # prunable channel groups: all | inner
        budget=0.3, budget_metric="params",  # params | flops fraction the deployed net must meet
        budget_weight=5.0, budget_penalty="target",  # target: |E[fraction] - budget| | hinge: relu(E - budget)
        kl_weight=1.0, prior_alpha=1e-4, a_init=2.0, temperature=0.1,
        mask_mode="budget", threshold=1e-3,  # budget: top E[pi] meeting the budget | threshold: E[pi] >= t
        instance="pretrained", feature_convs=2,  # pretrained: features of the first convs | stem
        pooling="pma", embed_dim=64, num_heads=4, set_size=100,
        algorithm="fomaml",  # fomaml | maml | reptile
        meta_steps=200, tasks_per_step=4, meta_learning_rate=1e-3, task_ways=(),  # (): all reference classes
        inner_steps=5, inner_batch=32, inner_lr=0.01, query_size=64, reptile_lr=0.01, meta_weights=False,
        checkpoint_every=50,
        methods=("stamp", "dense", "magnitude", "snip_pretrained", "snip_init", "random", "bbdropout", "scratch"),
        baseline_widths="uniform",  # uniform: each criterion at a uniform ratio of STAMP's size | stamp: its widths
        finetune_epochs=5, finetune_learning_rate=0.01, scratch_learning_rate=0.05,
        bbdropout_epochs=5, snip_batch=256))

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, max_to_keep=2))
    c.eval = ml_collections.ConfigDict(dict(checkpoint="best"))  # best | last | <directory>
    return c
