"""nbdkit-noparallel-filter(1): a stricter thread model than the plugin's
(``serialize=requests``, the default, ``all-requests`` or ``connections``)."""

from __future__ import annotations

from collections.abc import Callable

from luanbd.backend.chain import Backend
from luanbd.backend.interface import StartupError, ThreadModel

MODES = {
    "requests": ThreadModel.SERIALIZE_REQUESTS,
    "all-requests": ThreadModel.SERIALIZE_ALL_REQUESTS,
    "connections": ThreadModel.SERIALIZE_CONNECTIONS,
}


class Filter(Backend):
    name = "noparallel"
    config_help = "serialize=<MODE>      'requests' (default), 'all-requests', 'connections'."

    def __init__(self) -> None:
        self._model = ThreadModel.SERIALIZE_REQUESTS

    @property
    def thread_model(self) -> ThreadModel:
        return self._model

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key != "serialize":
            next(key, value)
            return
        model = MODES.get(value)
        if model is None:
            raise StartupError(f"unknown noparallel serialize mode '{value}'")
        self._model = model
