"""The one error hierarchy of jlora: every bad-input error is an :class:`AdapterError`; and its one
warning category of its own, :class:`UnwrappedAdapterWarning`.

Example:
    >>> try:
    ...     jlora.load(params, "missing_dir")
    ... except jlora.AdapterError as err:
    ...     print(err)
"""
from __future__ import annotations

from collections.abc import Iterable


class AdapterError(ValueError):
    """Bad input: an adapter, a config or a parameter tree that jlora cannot use.

    ``problems`` lists every individual problem found (the message shows them all).
    """

    def __init__(self, message: str, problems: Iterable[str] = ()):
        self.problems = list(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class ConfigError(AdapterError):
    """adapter_config.json (or a LoraConfig) is malformed or asks for something unsupported."""


class CheckpointError(AdapterError):
    """adapter_model.safetensors is missing, malformed, or holds unusable tensors."""


class TargetMismatchError(AdapterError):
    """The adapter's tensors do not fit the parameter tree (unmatched keys, wrong shapes)."""


class UnsupportedAdapterError(AdapterError):
    """A valid PEFT adapter of a kind jlora does not implement (peft_type, init mode, ...)."""


class SourceError(AdapterError):
    """The adapter's files could not be found or downloaded (local folder or Hub)."""


class UnwrappedAdapterWarning(UserWarning):
    """A Flax model read its parameters straight out of a LoRA tree, without :func:`jlora.wrap`: it runs the base
    weights and the adapter has no effect. Make it an error with
    ``warnings.simplefilter("error", jlora.UnwrappedAdapterWarning)``.

    Example:
        >>> model(ids, params=lora_params)                                    # warns: the adapter is ignored
        >>> jax.jit(jlora.wrap(model.__call__))(ids, params=lora_params)      # runs it
    """
