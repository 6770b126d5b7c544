"""Typed chat messages: what the agent sends to a policy, and what a trajectory replays.

A message has a role and a list of parts, each text or an image reference. Policy backends map
these to their own formats (an OpenAI chat payload, a transformers chat template).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from genagent.images import ImageRef

__all__ = ["ImagePart", "Message", "Part", "Role", "TextPart"]

Role = Literal["system", "user", "assistant"]


class TextPart(BaseModel):
    """A run of text inside a message."""

    model_config = ConfigDict(frozen=True)

    type: Literal["text"] = "text"
    text: str


class ImagePart(BaseModel):
    """An image inside a message, by reference."""

    model_config = ConfigDict(frozen=True)

    type: Literal["image"] = "image"
    image: ImageRef


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    """One chat message.

    Attributes:
        role: ``"system"``, ``"user"`` or ``"assistant"``.
        content: Text and image parts, in order.
    """

    model_config = ConfigDict(frozen=True)

    role: Role
    content: tuple[Part, ...]

    @classmethod
    def system(cls, text: str) -> Message:
        """Build a system message."""
        return cls(role="system", content=(TextPart(text=text),))

    @classmethod
    def user(cls, *parts: str | ImageRef) -> Message:
        """Build a user message from strings and image references, in order."""
        return cls(role="user", content=_parts(parts))

    @classmethod
    def assistant(cls, text: str) -> Message:
        """Build an assistant message."""
        return cls(role="assistant", content=(TextPart(text=text),))

    @property
    def text(self) -> str:
        """The text parts joined (images omitted)."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImageRef]:
        """The images of this message, in order."""
        return [p.image for p in self.content if isinstance(p, ImagePart)]


def _parts(items: tuple[str | ImageRef, ...]) -> tuple[TextPart | ImagePart, ...]:
    out: list[TextPart | ImagePart] = []
    for item in items:
        if isinstance(item, ImageRef):
            out.append(ImagePart(image=item))
        elif isinstance(item, str):
            if item:
                out.append(TextPart(text=item))
        else:
            raise TypeError(f"message parts are str or ImageRef, not {type(item).__name__}")
    return tuple(out)
