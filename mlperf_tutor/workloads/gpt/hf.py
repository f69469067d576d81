"""Hugging Face transformers <-> canonical GPT: GPT2LMHeadModel (gpt3), GPTJForCausalLM (gptj).

One naming object per transformers class, :data:`GPT2_NAMING` and :data:`GPTJ_NAMING`
(:class:`GptNaming`: rename tables, config mapping, ``from_hf``/``to_hf`` for state dicts), and
the workloads' ``hf`` attributes built from them, :data:`GPT2_INTEROP` and :data:`GPTJ_INTEROP`
(:class:`~mlperf_tutor.core.interop.HfInterop`).

GPT-2 names the GPT-3 architecture (learned positions, pre-LN blocks, tied head) with
``Conv1D`` layers, whose weights are (in, out): every matrix is transposed, and the fused
``attn.c_attn`` (D, 3 D) is split into q, k and v (its columns, in that order). GPT-J's
``nn.Linear`` layers have our layouts, so it is a rename. Buffers of old files (``attn.bias``,
``attn.masked_bias``: causal masks) are ignored, and a tied ``lm_head.weight`` copy is checked
and dropped. Files of the bare ``GPT2Model``/``GPTJModel`` (no ``transformer.`` prefix, as
``openai-community/gpt2`` ships) are read too.

Nothing here imports transformers: files are read and written by ``mlperf_tutor.convert``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlperf_tutor import convert
from mlperf_tutor.core.checkpoint import CheckpointError, Tree, check_tree
from mlperf_tutor.core.config import ConfigError, ConfigSource
from mlperf_tutor.core.interop import HfInterop
from mlperf_tutor.workloads.gpt.config import Gpt3Config, GptConfig, GptjConfig

# Config fields a checkpoint fixes (convert refuses a config that differs in one of them).
# padded_vocab_size, not vocab_size: HF stores the padded table, so gpt3's "tiny" (90 tokens
# padded to 96) matches a checkpoint whose config says vocab_size 96.
ARCHITECTURE = (
    "num_layers",
    "hidden",
    "num_heads",
    "ffn",
    "padded_vocab_size",
    "max_positions",
    "position",
    "rotary_dim",
    "rotary_base",
    "parallel_residual",
    "attention_bias",
    "mlp_bias",
    "tie_embeddings",
    "lm_head_bias",
    "activation",
    "norm_eps",
)
# Our activation -> transformers' name; on reading, "gelu_pytorch_tanh" is the same function.
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# Causal-mask buffers that old transformers versions saved with the weights.
_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


class GptNaming:
    """Names, config and ``save_pretrained`` directories of one transformers GPT class.

    Subclasses fill in the class attributes and the config mapping.
    """

    workload = ""  # our workload's name
    model_type = ""  # transformers' model_type
    model_class = ""  # the transformers class the files are for
    config_class: type[GptConfig] = GptConfig
    default_preset = ""
    # transformers' config defaults, for keys a config.json leaves out (as transformers does).
    hf_defaults: dict[str, Any] = {}
    # canonical module inside blocks.{i} -> (HF module inside transformer.h.{i}, transposed)
    block: dict[str, tuple[str, bool]] = {}
    # canonical top-level module -> HF module
    top: dict[str, str] = {}
    # canonical attention projection -> its part of the fused HF module (GPT-2's c_attn)
    fused: dict[str, int] = {}
    fused_module = ""

    # --- names ---------------------------------------------------------------------------
    def _to_hf_name(self, name: str) -> tuple[str, int | None, bool]:
        """Canonical name -> (HF name, part of a fused tensor or None, transposed)."""
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        if match:
            index, module, leaf = match.groups()
            if module in self.fused:
                return f"transformer.h.{index}.{self.fused_module}.{leaf}", self.fused[module], True
            if module in self.block:
                theirs, transposed = self.block[module]
                return f"transformer.h.{index}.{theirs}.{leaf}", None, transposed
        module, _, leaf = name.rpartition(".")
        if module in self.top:
            return f"{self.top[module]}.{leaf}", None, False
        raise ValueError(f"canonical {self.workload} name {name!r} has no {self.model_class} key")

    def _from_hf_name(self, name: str) -> list[tuple[str, int | None, bool]]:
        """HF name -> [(canonical name, part of the fused tensor or None, transposed)]."""
        match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", name)
        if match:
            index, module, leaf = match.groups()
            if module == self.fused_module:
                return [
                    (f"blocks.{index}.{m}.{leaf}", part, True) for m, part in self.fused.items()
                ]
            for ours, (theirs, transposed) in self.block.items():
                if module == theirs:
                    return [(f"blocks.{index}.{ours}.{leaf}", None, transposed)]
        module, _, leaf = name.rpartition(".")
        for ours, theirs in self.top.items():
            if module == theirs and leaf in ("weight", "bias"):
                return [(f"{ours}.{leaf}", None, False)]
        raise ValueError(
            f"Hugging Face key {name!r} is not part of {self.model_class}; is this a "
            f"{self.model_type} checkpoint?"
        )

    def from_hf(
        self, state: Mapping[str, np.ndarray], tie_embeddings: bool = False
    ) -> dict[str, np.ndarray]:
        """An HF state dict (numpy, ``transformer.``-prefixed names) -> canonical tree.

        Matrices come back as transposed views (no copy); buffers are skipped, and so is
        ``lm_head.weight`` when ``tie_embeddings`` (a ``state_dict`` holds the tied copy).
        """
        tree = {}
        for name, array in state.items():
            if _BUFFER.fullmatch(name) or (tie_embeddings and name == "lm_head.weight"):
                continue
            for ours, part, transposed in self._from_hf_name(name):
                value = array if part is None else np.split(array, len(self.fused), axis=-1)[part]
                tree[ours] = value.T if transposed else value
        return tree

    def to_hf(self, tree: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Canonical tree -> HF state dict (what ``save_pretrained`` writes)."""
        return dict(self._iter_hf(tree))

    def _iter_hf(self, tree: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, array) of ``tree``, each built when asked for (fused ones concatenated)."""
        done = set()
        for name in tree:
            theirs, part, transposed = self._to_hf_name(name)
            if theirs in done:
                continue
            done.add(theirs)
            if part is None:
                yield theirs, tree[name].T if transposed else tree[name]
                continue
            prefix, _, leaf = name.rpartition(".")
            prefix = prefix.rpartition(".")[0]  # blocks.{i}.attention
            parts = [tree[f"{prefix}.{m.rpartition('.')[2]}.{leaf}"] for m in self.fused]
            yield theirs, np.concatenate([p.T for p in parts], axis=-1)

    def hf_shapes(self, cfg: GptConfig) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every tensor of ``cfg``'s ``save_pretrained`` file."""
        from mlperf_tutor.workloads.gpt import canonical_shapes  # the package imports us

        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in canonical_shapes(cfg).items():
            theirs, part, transposed = self._to_hf_name(name)
            shape = shape[::-1] if transposed else shape
            if part is not None and theirs in shapes:
                shape = (*shape[:-1], shapes[theirs][-1] + shape[-1])
            shapes[theirs] = tuple(shape)
        return shapes

    # --- config ----------------------------------------------------------------------------
    def config_from_hf(self, hf_config: Any, preset: str | None = None, **overrides) -> GptConfig:
        """Our config of a transformers model: architecture from ``hf_config``, the rest from
        ``preset``.

        The vocabulary is HF's ``vocab_size`` (the padded table) with ``vocab_multiple`` 1,
        unless ``vocab_size`` and ``vocab_multiple`` overrides pad to exactly that size (e.g.
        50257 tokens padded to 50304). One dropout rate: ``resid_pdrop``. When the model has
        fewer positions than the preset's ``seq_len``, ``seq_len`` becomes that number.

        Args:
            hf_config: a transformers config, its dict, a config.json path or a
                ``save_pretrained`` directory.
            preset: the preset of the non-architecture fields (default: the full model's).
            **overrides: other fields (not architecture ones, which the checkpoint fixes).

        Raises:
            ConfigError: another model type, a feature our decoder lacks, a value of the wrong
                type or range (the key is named), or an architecture override;
                ``CheckpointError`` instead when ``hf_config`` is a file or directory.
        """
        data, where, error = convert.hf_config_dict(hf_config)
        source = ConfigSource(self.config_class, data, where, error)
        return self._config(source, preset or self.default_preset, overrides)

    def _fields(self, src: ConfigSource) -> dict[str, Any]:
        raise NotImplementedError

    def _config(self, src: ConfigSource, preset: str, overrides: dict) -> GptConfig:
        if src.data.get("model_type") != self.model_type:
            src.fail(
                f"has model_type={src.data.get('model_type')!r}; the {self.workload} "
                f"workload reads {self.model_class} checkpoints (model_type="
                f"{self.model_type!r})"
            )
        defaults = self.hf_defaults
        act = src.string("activation_function", defaults["activation_function"])
        if act not in _ACT_FROM_HF:
            src.fail(
                f"has activation_function={act!r}; our decoder implements "
                f"{sorted(_ACT_FROM_HF)} and cannot load this model"
            )
        fields = self._fields(src)
        hidden = src.field("n_embd", "hidden", defaults["n_embd"])
        ffn = src.field("n_inner", "ffn", None) if src.data.get("n_inner") is not None else None
        fields |= {
            "activation": _ACT_FROM_HF[act],
            "num_layers": src.field("n_layer", "num_layers", defaults["n_layer"]),
            "hidden": hidden,
            "num_heads": src.field("n_head", "num_heads", defaults["n_head"]),
            "ffn": 4 * hidden if ffn is None else ffn,
            "vocab_size": src.field("vocab_size", "vocab_size", defaults["vocab_size"]),
            "vocab_multiple": 1,
            "max_positions": src.field("n_positions", "max_positions", defaults["n_positions"]),
            "norm_eps": src.field("layer_norm_epsilon", "norm_eps", defaults["layer_norm_epsilon"]),
            "dropout": src.field("resid_pdrop", "dropout", defaults["resid_pdrop"]),
            "init_std": src.field("initializer_range", "init_std", defaults["initializer_range"]),
        }
        fixed = sorted(set(overrides) & (set(ARCHITECTURE) - {"padded_vocab_size"}))
        if fixed:
            raise ConfigError(f"{fixed} come from {src.where}; they cannot be overridden")
        base = self.config_class.preset(preset)
        seq_len = overrides.get("seq_len", min(base.seq_len, fields["max_positions"]))
        cfg = src.build(preset, fields | {"seq_len": seq_len}, overrides)
        if cfg.padded_vocab_size != fields["vocab_size"]:
            raise ConfigError(
                f"vocab_size {cfg.vocab_size} padded to a multiple of {cfg.vocab_multiple} is "
                f"{cfg.padded_vocab_size} rows, but {src.where} has vocab_size "
                f"{fields['vocab_size']}; choose vocab_size and vocab_multiple that pad to it",
                "vocab_size",
            )
        return cfg

    def _require(self, cfg: GptConfig, wants: dict[str, Any]) -> None:
        """A ValueError naming the first field of ``cfg`` that the HF class cannot express."""
        for field, want in wants.items():
            if getattr(cfg, field) != want:
                raise ValueError(
                    f"{self.model_class} cannot express {field}={getattr(cfg, field)!r} "
                    f"(it has {field}={want!r}); this config has no {self.model_type} checkpoint"
                )

    def config_to_hf(self, cfg: GptConfig) -> dict[str, Any]:
        """The config.json of ``cfg`` for transformers (vocab_size: the padded table)."""
        eos = 50256 if cfg.padded_vocab_size > 50256 else None  # GPT-2 BPE's <|endoftext|>
        return {
            "architectures": [self.model_class],
            "model_type": self.model_type,
            "vocab_size": cfg.padded_vocab_size,
            "n_positions": cfg.max_positions,
            "n_embd": cfg.hidden,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.ffn,
            "activation_function": _ACT_TO_HF[cfg.activation],
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": cfg.init_std,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "dtype": "float32",
        }

    # --- save_pretrained directories ---------------------------------------------------------
    def _specs(self, cfg: GptConfig) -> dict[str, tuple[tuple[int, ...], str]]:
        from mlperf_tutor.workloads.gpt import canonical_shapes

        return {k: (s, "float32") for k, s in canonical_shapes(cfg).items()}

    def load_pretrained(self, directory: str | os.PathLike) -> tuple[GptConfig, Tree]:
        """Read a transformers ``save_pretrained`` directory (memory-mapped, no transformers).

        Returns:
            (config from :meth:`config_from_hf` with the default preset, canonical tree in
            canonical order; GPT-2's matrices are transposed views of the mapped file).

        Raises:
            CheckpointError: another architecture, missing or corrupt files, tensors missing,
                unexpected or misshapen (every one named, in HF names), or an ``lm_head``
                that is not the tied copy of the word embeddings.
        """
        config = convert.read_hf_config(directory)
        where = Path(directory) / convert.HF_CONFIG
        src = ConfigSource(self.config_class, config, where, CheckpointError)
        cfg = self._config(src, self.default_preset, {})
        shapes = self.hf_shapes(cfg)
        convert.check_hf_declared_size(directory, shapes, src.sizes(cfg))
        weights = convert.read_hf_weights(directory)
        if not any(k.startswith("transformer.") for k in weights):  # a bare GPT2Model file
            weights = {
                k if k.startswith("lm_head.") else f"transformer.{k}": v for k, v in weights.items()
            }
        state = {k: v for k, v in weights.items() if not _BUFFER.fullmatch(k)}
        wte = "transformer.wte.weight"
        if cfg.tie_embeddings and "lm_head.weight" in state and wte in state:
            if not _same_bits(state.pop("lm_head.weight"), state[wte]):
                raise CheckpointError(
                    f"{directory} holds an lm_head.weight that differs from {wte}, but its "
                    "config ties them (tie_word_embeddings); re-save the model"
                )
        expected = {k: (s, "float32") for k, s in shapes.items()}
        check_tree(
            expected,
            state,
            where=str(directory),
            check_dtype=False,
            hint=f"mlperf_tutor's {self.workload} reads {self.model_class} checkpoints (this "
            f"one's architectures: {config.get('architectures')})",
        )
        tree = self.from_hf(state)
        return cfg, {name: tree[name] for name in self._specs(cfg)}

    def save_pretrained(
        self, tree: Mapping[str, np.ndarray], cfg: GptConfig, directory: str | os.PathLike
    ) -> None:
        """Write a canonical tree as a ``save_pretrained`` directory of the HF class.

        Writes config.json and one ``model.safetensors`` (no tied ``lm_head`` copy, as
        transformers 5 writes), tensor by tensor. Atomic: the directory appears complete or
        not at all.

        Raises:
            ValueError: ``cfg`` is not expressible by the HF class.
            CheckpointMismatch: the tree does not fit ``cfg`` (every bad key named).
            CheckpointError: the write failed, or ``directory`` exists and holds other files.
        """
        config = self.config_to_hf(cfg)
        check_tree(self._specs(cfg), tree, where=f"the tree for {directory}", check_dtype=False)
        dtypes = convert.specs_of(tree, str(directory))
        shapes, specs = self.hf_shapes(cfg), {}
        for name in tree:
            theirs = self._to_hf_name(name)[0]
            specs.setdefault(theirs, convert.TensorSpec(shapes[theirs], dtypes[name].dtype))
        config["dtype"] = dtypes["embeddings.word_embeddings.weight"].dtype.name
        convert.write_hf_directory(directory, config, specs, self._iter_hf(tree))

    def interop(self) -> HfInterop:
        """This naming as a workload's ``hf`` attribute."""
        return HfInterop(
            architecture=ARCHITECTURE,
            config_from_hf=self.config_from_hf,
            config_to_hf=self.config_to_hf,
            load_pretrained=self.load_pretrained,
            save_pretrained=self.save_pretrained,
        )


class Gpt2Naming(GptNaming):
    """gpt3 <-> ``GPT2LMHeadModel``."""

    workload = "gpt3"
    model_type = "gpt2"
    model_class = "GPT2LMHeadModel"
    config_class = Gpt3Config
    default_preset = "mlperf"
    hf_defaults = {
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
    }
    block = {
        "attention_norm": ("ln_1", False),
        "attention.o_proj": ("attn.c_proj", True),
        "mlp_norm": ("ln_2", False),
        "mlp.fc_in": ("mlp.c_fc", True),
        "mlp.fc_out": ("mlp.c_proj", True),
    }
    top = {
        "embeddings.word_embeddings": "transformer.wte",
        "embeddings.position_embeddings": "transformer.wpe",
        "final_norm": "transformer.ln_f",
        "lm_head": "lm_head",
    }
    fused = {"attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
    fused_module = "attn.c_attn"

    def _fields(self, src: ConfigSource) -> dict[str, Any]:
        # reorder_and_upcast_attn is accepted: it only changes the precision of the scores
        # (float32 either way for a float32 model), not the function.
        for key, want in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
        ):
            src.require(
                key,
                want,
                "has {key}={got}; our GPT-3 decoder has {key}={want!r} and cannot load this model",
            )
        return {
            "position": "learned",
            "rotary_dim": 0,
            "rotary_base": 10000.0,
            "parallel_residual": False,
            "attention_bias": True,
            "mlp_bias": True,
            "tie_embeddings": src.field("tie_word_embeddings", "tie_embeddings", True),
            "lm_head_bias": False,
        }

    def config_to_hf(self, cfg: GptConfig) -> dict[str, Any]:
        self._require(
            cfg,
            {
                "position": "learned",
                "parallel_residual": False,
                "attention_bias": True,
                "mlp_bias": True,
                "lm_head_bias": False,
            },
        )
        return super().config_to_hf(cfg) | {
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
        }


class GptjNaming(GptNaming):
    """gptj <-> ``GPTJForCausalLM``."""

    workload = "gptj"
    model_type = "gptj"
    model_class = "GPTJForCausalLM"
    config_class = GptjConfig
    default_preset = "full"
    hf_defaults = {
        "vocab_size": 50400,
        "n_positions": 2048,
        "n_embd": 4096,
        "n_layer": 28,
        "n_head": 16,
        "rotary_dim": 64,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
    }
    block = {
        "attention_norm": ("ln_1", False),
        "attention.q_proj": ("attn.q_proj", False),
        "attention.k_proj": ("attn.k_proj", False),
        "attention.v_proj": ("attn.v_proj", False),
        "attention.o_proj": ("attn.out_proj", False),
        "mlp.fc_in": ("mlp.fc_in", False),
        "mlp.fc_out": ("mlp.fc_out", False),
    }
    top = {
        "embeddings.word_embeddings": "transformer.wte",
        "final_norm": "transformer.ln_f",
        "lm_head": "lm_head",
    }

    def _fields(self, src: ConfigSource) -> dict[str, Any]:
        src.require(
            "tie_word_embeddings",
            False,
            "has {key}={got}; GPT-J's head is untied (it has a bias), and our decoder cannot "
            "load this model",
        )
        if src.data.get("rotary_dim", 64) is None:
            # transformers then rotates whole hidden-size vectors: only valid with one head.
            src.fail(
                "has rotary_dim=None; our decoder needs an even rotary_dim of at most the head dim"
            )
        return {
            "position": "rotary",
            "rotary_dim": src.field("rotary_dim", "rotary_dim", self.hf_defaults["rotary_dim"]),
            "rotary_base": 10000.0,
            "parallel_residual": True,
            "attention_bias": False,
            "mlp_bias": True,
            "tie_embeddings": False,
            "lm_head_bias": True,
        }

    def config_to_hf(self, cfg: GptConfig) -> dict[str, Any]:
        self._require(
            cfg,
            {
                "position": "rotary",
                "rotary_base": 10000.0,
                "parallel_residual": True,
                "attention_bias": False,
                "mlp_bias": True,
                "tie_embeddings": False,
                "lm_head_bias": True,
            },
        )
        return super().config_to_hf(cfg) | {"rotary_dim": cfg.rotary_dim}


GPT2_NAMING = Gpt2Naming()
GPTJ_NAMING = GptjNaming()
# What the gpt3 and gptj workloads' ``hf`` attributes give convert and users.
GPT2_INTEROP = GPT2_NAMING.interop()
GPTJ_INTEROP = GPTJ_NAMING.interop()

__all__ = [
    "ARCHITECTURE",
    "GPT2_INTEROP",
    "GPT2_NAMING",
    "GPTJ_INTEROP",
    "GPTJ_NAMING",
    "Gpt2Naming",
    "GptNaming",
    "GptjNaming",
]
