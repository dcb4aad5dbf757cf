"""Engines: transformers (always available) behind the small interface in engines.base."""

from genrec.engines.base import Engine, encode_chat, encode_chats
from genrec.engines.hf import HFEngine, HFStepModel

__all__ = ["Engine", "HFEngine", "HFStepModel", "encode_chat", "encode_chats"]
