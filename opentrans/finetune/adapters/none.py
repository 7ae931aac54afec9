"""``--adapter none``: no adapter; the plan's trainable layers train directly."""

from opentrans.finetune.adapters.common import ADAPTERS, AdapterKind

ADAPTERS.add("none", AdapterKind("none", None, order=0))
