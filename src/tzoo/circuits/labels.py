"""Feature labels by auto-interpretation (Bills et al. 2023; the "detection" score of
Paulo et al. 2024, EleutherAI's delphi).

**Explaining.** ``explain_feature`` shows a language model (the *explainer*) a feature's top
activating contexts, with the tokens where it fires strongly marked ``<<like this>>``
(activation at least ``HIGHLIGHT_FRACTION`` of the feature's max; neighbouring marked
tokens share one pair of brackets), and the tokens its decoder direction promotes, and asks
for a short label. The answer's first non-empty line, cleaned of prefixes ("Label:"),
quotes and markdown, is the label (``parse_label``).

**Scoring by detection.** ``score_detection`` gives the explainer the label and a shuffled
mix of held-out contexts, some where the feature fires and some where it is silent
throughout (``tzoo.circuits.features.detection_contexts`` draws them), ``contexts_per_prompt``
texts a prompt, and asks which ones the feature fires on; the answer is a list of 0s and 1s.
A context counts as activating when its max activation is > 0. When an answer cannot be read
as exactly one 0/1 per text, each of its texts is asked again alone (answer 1 or 0); a text
whose answer still cannot be read is unanswered, scored as "does not fire" and counted in
``n_unanswered``. Reported: balanced accuracy (the mean of recall on activating and on
silent contexts, 0.5 for a label that predicts nothing), precision, recall and each
context's prediction.

Each prompt is a chat: a system message, one worked example (user turn and answer), then
the question; SmolLM2-135M-Instruct keeps to the answer format far more often with the
example than without.

**Explainers.** Anything with ``complete(messages, *, max_tokens) -> str`` (OpenAI-style
``{"role", "content"}`` messages):

- ``LocalExplainer(handle)``: a bundled instruct model (SmolLM2-135M-Instruct by default)
  through its chat template (plain "Role: text" turns for a tokenizer without one),
  greedy, at most ``max_tokens`` new tokens.
- ``OpenAICompatibleExplainer(url, api_key, model, timeout)``: ``POST {url}/chat/completions``
  (temperature 0, ``max_tokens``), the key as a Bearer token. Unreachable endpoints,
  timeouts, HTTP errors and malformed answers raise the matching ``ExplainerError``.

``explainer_from_settings`` picks the endpoint when ``TZOO_AUTOINTERP_URL`` is set, else the
local model named by ``TZOO_AUTOINTERP_MODEL``.

The prompts are the module constants below (``EXPLAIN_*``, ``DETECT_*``). A 135M-parameter
model follows them loosely (it often echoes a context or answers with the wrong list), which
is why the parsers are forgiving; its labels are a starting point, an endpoint's are better.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import torch
from transformers import GenerationConfig

from tzoo.circuits.features import FeatureContext, FeatureDashboard
from tzoo.config import Settings
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

LABEL_VERSION = 1
HIGHLIGHT_FRACTION = 0.3  # mark tokens at >= this fraction of the feature's max activation
MAX_LABEL_CHARS = 120
EXPLAIN_MAX_TOKENS = 32
DEFAULT_TIMEOUT_S = 60.0

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}

# Each prompt is the system message, one worked example (a user turn and the assistant's
# answer: small instruct models follow the format far better with it), then the question.
EXPLAIN_SYSTEM = (
    "You label the features of a language model. A feature is a pattern detector that fires "
    "on some tokens of a text. You see texts where the feature fires; the tokens where it "
    "fires most are marked like <<this>>. Reply with one short label (at most 10 words) "
    "saying what the marked tokens have in common, and nothing else."
)
EXPLAIN_USER = "Texts where the feature fires:\n{examples}\n{logits}\nLabel:"
EXPLAIN_LOGITS = "Tokens the feature makes more likely next: {tokens}\n"
EXPLAIN_EXAMPLE = (
    EXPLAIN_USER.format(
        examples="1. I ate an <<apple>> for lunch.\n2. <<Bananas>> are yellow.\n"
        "3. She bought <<grapes>> and <<pears>>.",
        logits=EXPLAIN_LOGITS.format(tokens="juice, pie, tree"),
    ),
    "fruit names",
)

DETECT_SYSTEM = (
    "You check a label of a language-model feature. A feature is a pattern detector that "
    "fires on some tokens of a text. For each numbered text, decide whether the feature "
    "described by the label fires anywhere in it. Reply with only a list of 0s and 1s, one "
    "per text, in order: 1 if it fires, 0 if not."
)
DETECT_USER = "Label: {label}\n\nTexts:\n{texts}\n\nReply with a list of {n} numbers."
DETECT_EXAMPLE = (
    DETECT_USER.format(
        label="fruit names",
        texts="1. I ate an apple.\n2. The car is red.\n3. Bananas are yellow.\n4. We walked home.",
        n=4,
    ),
    "[1, 0, 1, 0]",
)
# Asked one text at a time when a list answer cannot be read.
DETECT_ONE_SYSTEM = (
    "You check a label of a language-model feature against one text. A feature is a pattern "
    "detector that fires on some tokens of a text. Reply 1 if the feature described by the "
    "label fires anywhere in the text, 0 if not. Reply with only 1 or 0."
)
DETECT_ONE_USER = "Label: {label}\n\nText: {text}"
DETECT_ONE_EXAMPLES = (
    (DETECT_ONE_USER.format(label="fruit names", text="I ate an apple."), "1"),
    (DETECT_ONE_USER.format(label="fruit names", text="The car is red."), "0"),
)


class ExplainerError(RuntimeError):
    """The explainer could not give an answer (with why)."""


class ExplainerUnreachableError(ExplainerError):
    """The endpoint refused or could not be reached."""


class ExplainerTimeoutError(ExplainerError):
    """The endpoint did not answer in time."""


class ExplainerHTTPError(ExplainerError):
    """The endpoint answered with an HTTP error status."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class ExplainerResponseError(ExplainerError):
    """The answer is not what an OpenAI-compatible endpoint returns, or holds no label."""


class Explainer(Protocol):
    name: str

    def complete(self, messages: Sequence[Message], *, max_tokens: int) -> str:
        """The model's reply to a chat (system message first, user message last)."""
        ...


def _chat(system: str, example: tuple[str, str], user: str) -> list[Message]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": example[0]},
        {"role": "assistant", "content": example[1]},
        {"role": "user", "content": user},
    ]


# -- explaining -----------------------------------------------------------------------------


def explanation_prompt(
    dashboard: FeatureDashboard, *, n_contexts: int = 10, n_logits: int = 10
) -> list[Message]:
    """The chat asking for a label of ``dashboard``'s feature."""
    contexts = dashboard.top_contexts[:n_contexts]
    if not contexts:
        raise ValueError(
            f"Feature {dashboard.layer}/{dashboard.feature} never fires on the corpus: "
            "there is nothing to explain."
        )
    threshold = HIGHLIGHT_FRACTION * dashboard.max_activation
    examples = "\n".join(
        f"{i}. {_highlighted(context, threshold)}" for i, context in enumerate(contexts, 1)
    )
    tokens = [t.token.strip() for t in dashboard.top_logits[:n_logits]]
    tokens = [t for t in tokens if t]
    logits = EXPLAIN_LOGITS.format(tokens=", ".join(tokens)) if tokens else ""
    user = EXPLAIN_USER.format(examples=examples, logits=logits)
    return _chat(EXPLAIN_SYSTEM, EXPLAIN_EXAMPLE, user)


def explain_feature(
    dashboard: FeatureDashboard,
    explainer: Explainer,
    *,
    n_contexts: int = 10,
    max_tokens: int = EXPLAIN_MAX_TOKENS,
) -> str:
    """A short label of the feature from its top contexts (see the module docstring).
    ExplainerResponseError when the answer holds no label."""
    messages = explanation_prompt(dashboard, n_contexts=n_contexts)
    answer = explainer.complete(messages, max_tokens=max_tokens)
    label = parse_label(answer)
    if not label:
        raise ExplainerResponseError(
            f"The explainer {explainer.name} gave no label; it answered {answer[:200]!r}."
        )
    return label


_THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:label|explanation|answer|feature(?:\s+label)?)\s*(?:is)?\s*:\s*)+"
    r"|^(?:this|the)\s+feature\s+(?:detects|fires\s+on|responds\s+to|marks|is\s+about)\s+",
    re.IGNORECASE,
)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"  # straight and curly quotes
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters but \t, \n
_MARKER = re.compile(r"^(?:[-*•>#]+|\d+[.)])\s*")  # list markers and headings


def parse_label(answer: str) -> str:
    """The label in an explainer's answer: its first line with text (past a line ending in
    a colon that introduces more), without reasoning blocks, control characters, list
    markers, "Label:"-like prefixes, markdown emphasis, quotes, a final full stop or repeated
    items, cut to ``MAX_LABEL_CHARS`` at a word boundary. "" when there is none."""
    lines = [line for line in _THINKING.sub("", answer).splitlines() if line.strip()]
    for number, line in enumerate(lines):
        if line.rstrip().endswith(":") and number + 1 < len(lines):
            continue  # an introduction ("The feature detects the following:")
        label = _MARKER.sub("", _CONTROL.sub("", line).strip())
        label = _PREFIX.sub("", label).replace("**", "").replace("__", "")
        label = label.replace("<<", "").replace(">>", "")
        label = label.strip().strip(_QUOTES).strip().rstrip(".").strip()
        label = _unrepeated(label)
        if label:
            if len(label) > MAX_LABEL_CHARS:
                label = label[:MAX_LABEL_CHARS].rsplit(" ", 1)[0]
            return label
    return ""


def _unrepeated(label: str) -> str:
    """``label`` with runs of a repeated comma-separated item collapsed to one (a small
    model caught in a loop: "cats, his, his, his" -> "cats, his")."""
    items = [item.strip() for item in label.split(",")]
    kept = [item for i, item in enumerate(items) if i == 0 or item != items[i - 1]]
    return ", ".join(kept) if len(kept) < len(items) else label


def _highlighted(context: FeatureContext, threshold: float) -> str:
    """The context's text with tokens at or above ``threshold`` (and > 0) in << >>."""
    parts: list[str] = []
    open_span = False
    for token, activation in zip(context.tokens, context.activations, strict=True):
        piece = _plain(token)
        marked = activation > 0 and activation >= threshold
        if marked and not open_span:
            word = piece.lstrip()
            parts += [piece[: len(piece) - len(word)], "<<", word]  # "<<" after a space
        elif not marked and open_span:
            parts += [">>", piece]
        else:
            parts.append(piece)
        open_span = marked
    if open_span:
        parts.append(">>")
    return " ".join("".join(parts).split())


def _plain(token: str) -> str:
    return token.replace("↵", " ")  # display_tokens shows a newline as ↵


# -- scoring by detection -------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionPrediction:
    text: str
    activating: bool  # the truth: the feature fires somewhere in the context
    predicted: bool | None  # the explainer's call; None: its answer could not be read
    max_activation: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "activating": self.activating,
            "predicted": self.predicted,
            "max_activation": self.max_activation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectionPrediction:
        predicted = data.get("predicted")
        return cls(
            text=str(data["text"]),
            activating=bool(data["activating"]),
            predicted=None if predicted is None else bool(predicted),
            max_activation=float(data["max_activation"]),
        )


@dataclass(frozen=True)
class DetectionScore:
    """How well a label predicts where its feature fires on held-out contexts."""

    layer: int
    feature: int
    label: str
    explainer: str
    balanced_accuracy: float
    precision: float  # of the contexts called activating, the fraction that are (0 if none)
    recall: float  # of the activating contexts, the fraction called activating
    n_activating: int
    n_non_activating: int
    n_unanswered: int
    predictions: list[DetectionPrediction]  # in the order the explainer saw them

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": LABEL_VERSION,
            "layer": self.layer,
            "feature": self.feature,
            "label": self.label,
            "explainer": self.explainer,
            "balanced_accuracy": self.balanced_accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "n_activating": self.n_activating,
            "n_non_activating": self.n_non_activating,
            "n_unanswered": self.n_unanswered,
            "predictions": [p.to_dict() for p in self.predictions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectionScore:
        if data.get("version") != LABEL_VERSION:
            raise ValueError(
                f"Unsupported detection score version {data.get('version')!r}; this tzoo "
                f"reads version {LABEL_VERSION}."
            )
        return cls(
            layer=int(data["layer"]),
            feature=int(data["feature"]),
            label=str(data["label"]),
            explainer=str(data["explainer"]),
            balanced_accuracy=float(data["balanced_accuracy"]),
            precision=float(data["precision"]),
            recall=float(data["recall"]),
            n_activating=int(data["n_activating"]),
            n_non_activating=int(data["n_non_activating"]),
            n_unanswered=int(data["n_unanswered"]),
            predictions=[DetectionPrediction.from_dict(p) for p in data["predictions"]],
        )


def detection_prompt(label: str, texts: Sequence[str]) -> list[Message]:
    """The chat asking which of ``texts`` the labelled feature fires on."""
    numbered = "\n".join(f"{i}. {text}" for i, text in enumerate(texts, 1))
    user = DETECT_USER.format(label=label, texts=numbered, n=len(texts))
    return _chat(DETECT_SYSTEM, DETECT_EXAMPLE, user)


def score_detection(
    label: str,
    dashboard: FeatureDashboard,
    heldout_contexts: Sequence[FeatureContext],
    explainer: Explainer,
    *,
    contexts_per_prompt: int = 5,
    seed: int = 0,
) -> DetectionScore:
    """Score ``label`` by detection on ``heldout_contexts`` (needs at least one activating
    and one silent context), shuffled with ``seed`` (see the module docstring)."""
    if contexts_per_prompt < 1:
        raise ValueError(f"contexts_per_prompt must be at least 1; got {contexts_per_prompt}.")
    contexts = list(heldout_contexts)
    truth = [c.max_activation > 0 for c in contexts]
    if all(truth) or not any(truth):
        raise ValueError(
            "Detection needs held-out contexts of both kinds, activating and silent; got "
            f"{sum(truth)} activating of {len(truth)}."
        )
    order = list(range(len(contexts)))
    random.Random(seed).shuffle(order)
    texts = [_plain(contexts[i].text()).strip() for i in order]
    predicted: list[bool | None] = []
    for start in range(0, len(order), contexts_per_prompt):
        chunk = texts[start : start + contexts_per_prompt]
        messages = detection_prompt(label, chunk)
        answer = explainer.complete(messages, max_tokens=8 + 4 * len(chunk))
        calls: Sequence[bool | None] | None = parse_predictions(answer, len(chunk))
        if calls is None:
            calls = [_detect_one(label, text, explainer) for text in chunk]
        predicted += calls
    ordered_truth = [truth[i] for i in order]
    balanced, precision, recall = detection_metrics(ordered_truth, predicted)
    return DetectionScore(
        layer=dashboard.layer,
        feature=dashboard.feature,
        label=label,
        explainer=explainer.name,
        balanced_accuracy=balanced,
        precision=precision,
        recall=recall,
        n_activating=sum(truth),
        n_non_activating=len(truth) - sum(truth),
        n_unanswered=sum(p is None for p in predicted),
        predictions=[
            DetectionPrediction(text, actual, call, contexts[i].max_activation)
            for text, actual, call, i in zip(texts, ordered_truth, predicted, order, strict=True)
        ],
    )


def detection_one_prompt(label: str, text: str) -> list[Message]:
    """The chat asking whether the labelled feature fires on one text."""
    messages = [{"role": "system", "content": DETECT_ONE_SYSTEM}]
    for user, reply in DETECT_ONE_EXAMPLES:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": DETECT_ONE_USER.format(label=label, text=text)})
    return messages


def _detect_one(label: str, text: str, explainer: Explainer) -> bool | None:
    """The explainer's call on one text: its answer's first 0/1/yes/no/true/false."""
    answer = _THINKING.sub("", explainer.complete(detection_one_prompt(label, text), max_tokens=4))
    found = _CALL.search(answer)
    return None if found is None else found.group(1).lower() in ("1", "yes", "true")


def detection_metrics(
    truth: Sequence[bool], predicted: Sequence[bool | None]
) -> tuple[float, float, float]:
    """(balanced accuracy, precision, recall) of predictions against the truth; an
    unanswered prediction (None) counts as "does not fire"."""
    if len(truth) != len(predicted):
        raise ValueError("truth and predicted differ in length.")
    calls = [bool(p) for p in predicted]
    tp = sum(t and p for t, p in zip(truth, calls, strict=True))
    fp = sum(p and not t for t, p in zip(truth, calls, strict=True))
    tn = sum(not t and not p for t, p in zip(truth, calls, strict=True))
    positives = sum(truth)
    negatives = len(truth) - positives
    if not positives or not negatives:
        raise ValueError("Balanced accuracy needs both activating and silent contexts.")
    recall = tp / positives
    specificity = tn / negatives
    precision = tp / (tp + fp) if tp + fp else 0.0
    return (recall + specificity) / 2, precision, recall


_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_CALL = re.compile(r"\b(0|1|yes|no|true|false)\b", re.IGNORECASE)


def parse_predictions(answer: str, n: int) -> list[bool] | None:
    """Exactly ``n`` calls read from an answer: the first bracketed list holding ``n`` of
    0/1/yes/no/true/false, else ``n`` such words in the whole answer; None otherwise."""
    text = _THINKING.sub("", answer)
    for inside in _BRACKETS.findall(text):
        calls = _CALL.findall(inside)
        if len(calls) == n:
            return [c.lower() in ("1", "yes", "true") for c in calls]
    calls = _CALL.findall(text)
    if len(calls) == n:
        return [c.lower() in ("1", "yes", "true") for c in calls]
    return None


# -- explainers -----------------------------------------------------------------------------


class LocalExplainer:
    """A local instruct model as the explainer: its chat template, greedy decoding, the
    first new token neither special nor blank. Takes the handle's lock while generating."""

    def __init__(self, handle: ModelHandle) -> None:
        if handle.architecture != "decoder":
            raise ValueError(f"An explainer must generate text; {handle.name} is not a decoder.")
        self.handle = handle
        self.name = handle.name
        self._suppressed: tuple[list[int], list[int]] | None = None

    def _suppressed_tokens(self) -> tuple[list[int], list[int]]:
        """(never at the start, never at all): special and blank tokens may not begin the
        answer (a small model otherwise often answers nothing but newlines or stops at
        once); tokens with control characters other than newline and tab never appear."""
        if self._suppressed is None:
            tokenizer = self.handle.tokenizer
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            blank = {i for i, text in enumerate(texts) if not text.strip()}
            control = [i for i, text in enumerate(texts) if _CONTROL.search(text)]
            start = sorted(blank | set(tokenizer.all_special_ids))
            self._suppressed = (start, control)
        return self._suppressed

    def _fitted(self, ids: list[int], max_tokens: int) -> list[int]:
        """``ids`` cut to leave room for ``max_tokens`` in the model's context: the middle
        (the later examples) goes; the instructions at the start and the question with the
        answer's opening at the end stay."""
        config = self.handle.config
        context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if not isinstance(context, int) or len(ids) + max_tokens <= context:
            return ids
        room = context - max_tokens
        if room < 32:
            raise ExplainerError(
                f"{self.name}'s context ({context} tokens) leaves no room for a labelling "
                f"prompt and a {max_tokens}-token answer."
            )
        head = room // 3
        return ids[:head] + ids[len(ids) - (room - head) :]

    def complete(self, messages: Sequence[Message], *, max_tokens: int) -> str:
        tokenizer = self.handle.tokenizer
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:  # the tiny test models have no template
            turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            ids = tokenizer("\n\n".join([*turns, "Assistant:"]))["input_ids"]
        ids = self._fitted(list(ids), max_tokens)
        model = self.handle.model
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        pad = tokenizer.pad_token_id
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_tokens,
            pad_token_id=pad if pad is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            begin_suppress_tokens=self._suppressed_tokens()[0],
            suppress_tokens=self._suppressed_tokens()[1] or None,
        )
        generate: Any = model.generate
        with self.handle.lock, torch.no_grad():
            out = generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
            )
        return str(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))


class OpenAICompatibleExplainer:
    """An OpenAI-compatible chat-completions endpoint as the explainer. ``url`` is the API
    base (e.g. ``https://api.openai.com/v1``); the key, if any, goes as a Bearer token and
    never into error messages."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        model: str,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"The endpoint URL must start with http:// or https://; got {url!r}.")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"{model} at {url}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAICompatibleExplainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def complete(self, messages: Sequence[Message], *, max_tokens: int) -> str:
        body = {
            "model": self.model,
            "messages": list(messages),
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        try:
            response = self._client.post(self.url, json=body)
        except httpx.TimeoutException as error:
            raise ExplainerTimeoutError(
                f"The labelling endpoint {self.url} did not answer within "
                f"{self._client.timeout.read} s."
            ) from error
        except httpx.TransportError as error:
            raise ExplainerUnreachableError(
                f"Cannot reach the labelling endpoint {self.url}: {error}. Check "
                "TZOO_AUTOINTERP_URL, or leave it empty to label with the local model."
            ) from error
        if response.status_code >= 400:
            raise ExplainerHTTPError(
                f"The labelling endpoint {self.url} answered HTTP {response.status_code}: "
                f"{response.text[:300]!r}.",
                response.status_code,
            )
        return _message_content(response, self.url)


def _message_content(response: httpx.Response, url: str) -> str:
    """``choices[0].message.content`` of a chat-completions answer."""
    try:
        data = response.json()
    except ValueError as error:
        raise ExplainerResponseError(
            f"The labelling endpoint {url} answered with something that is not JSON: "
            f"{response.text[:200]!r}."
        ) from error
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as error:
        raise ExplainerResponseError(
            f"The labelling endpoint {url} answered JSON without choices[0].message.content: "
            f"{str(data)[:200]!r}."
        ) from error
    if not isinstance(content, str):
        raise ExplainerResponseError(
            f"The labelling endpoint {url} answered a {type(content).__name__} as the message "
            "content, not text."
        )
    return content


def explainer_from_settings(settings: Settings, manager: ModelManager) -> Explainer:
    """The endpoint of ``TZOO_AUTOINTERP_URL`` when set, else the local model
    ``TZOO_AUTOINTERP_MODEL`` (loaded through ``manager``)."""
    if settings.autointerp_url:
        return OpenAICompatibleExplainer(
            settings.autointerp_url, settings.autointerp_api_key, settings.autointerp_model
        )
    return LocalExplainer(manager.get(settings.autointerp_model))
