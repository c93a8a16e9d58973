"""bertstream's Python client: numpy in and out, over the generated stubs."""

from .client import AsyncBertClient, BertClient
from .messages import ClientError, Label, ModelStatus, RankedText, Ranking, StreamResult, Tokens

__all__ = ["AsyncBertClient", "BertClient", "ClientError", "Label", "ModelStatus",
           "RankedText", "Ranking", "StreamResult", "Tokens"]
