"""The vision lab's data, made offline and reproducibly: images with captions (stage 1) and questions with checkable
answers (stage 2 and evaluation), in four task families.

- charts: bar and line charts drawn by matplotlib with known values, labels and titles;
- documents: forms rendered with Pillow (a title and key: value fields), wide or tall;
- scenes: 1-6 shapes of one kind and colour on a plain background;
- emoji: Noto Color Emoji glyphs (Debian's fonts-noto-color-emoji) named by their Unicode names.

Every sample is a function of (family, split, index, seed). Train and held-out sets are disjoint by construction: a
held-out chart, form or scene never has the same content as a training one (its content key is excluded from
training), and held-out emoji are characters never seen in training, so naming them tests transfer, not memory.
Answers come from small closed sets, so chance accuracy is known per question type.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ligero.errors import LigeroError

FAMILIES = ("charts", "documents", "scenes", "emoji")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_SIZE = 109  # the only size the bitmap font has

LABELS = ("apples", "pears", "plums", "figs", "limes", "kiwis", "dates", "grapes", "melons", "lemons")
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
VALUES = tuple(range(10, 100, 10))
CHART_TITLES = ("Sales", "Rainfall", "Visitors", "Orders", "Profit", "Votes", "Scores", "Costs", "Exports",
                "Downloads", "Births", "Tickets")
DOC_TITLES = ("Invoice", "Receipt", "Report", "Order", "Permit", "Ticket", "Memo", "Notice")
FIELDS = {
    "Name": ("Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia"),
    "City": ("Paris", "Lima", "Oslo", "Cairo", "Delhi", "Tokyo", "Rome", "Quito", "Seoul", "Dakar"),
    "Day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "Code": tuple(str(n) for n in range(11, 100, 11)),
}
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 170), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# question type -> (family, the closed set of answers, or None where it depends on the image)
QUESTION_TYPES = {
    "chart_highest": "charts", "chart_value": "charts", "chart_title": "charts",
    "doc_field": "documents", "doc_title": "documents",
    "scene_count": "scenes", "scene_colour": "scenes", "scene_shape": "scenes",
    "emoji_choice": "emoji",
}


@dataclass
class QA:
    kind: str  # a QUESTION_TYPES key
    question: str
    answer: str
    choices: int  # how many answers were possible for this question (chance = 1 / choices)


@dataclass
class Sample:
    family: str
    image: Image.Image
    caption: str
    key: str  # the content's identity (disjoint splits are checked on it)
    qa: list[QA] = field(default_factory=list)


ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """An answer as compared, as VQA's evaluation does: lower case, articles, outer spaces and final punctuation
    removed (so "A triangle." matches "triangle"; "They are triangles." does not)."""
    text = text.strip().lower().rstrip(".!").strip().strip("\"'")
    return " ".join(ARTICLES.sub(" ", text).split())


# --- charts ------------------------------------------------------------------------------------------------------

CHART_SIZES = ((224, 224), (336, 224), (448, 224))


def chart(rng: random.Random) -> Sample:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = rng.choice(("bar", "line"))
    n = rng.randint(3, 6)
    labels = rng.sample(LABELS, n) if kind == "bar" else list(DAYS[:n])
    values = rng.sample(VALUES, n)  # distinct: one highest
    title = rng.choice(CHART_TITLES)
    width, height = rng.choice(CHART_SIZES)
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0.04, 0.15, 0.92, 0.66))
    colour = rng.choice(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])
    if kind == "bar":
        ax.bar(range(n), values, color=colour)
    else:
        ax.plot(range(n), values, color=colour, marker="o", linewidth=2)
    for i, v in enumerate(values):
        ax.text(i, v + 2, str(v), ha="center", va="bottom", fontsize=10)
    ax.set_xticks(range(n), labels, fontsize=10 if width > 224 else 8)
    ax.set_ylim(0, 118)
    ax.set_yticks([])
    ax.set_xlim(-0.6, n - 0.4)
    fig.suptitle(title, fontsize=14, y=0.99)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    image = Image.open(buf).convert("RGB").resize((width, height))
    top = labels[values.index(max(values))]
    pick = rng.randrange(n)
    thing = "bar" if kind == "bar" else "point"
    qa = [QA("chart_highest", f"Which {thing} is highest?", top, n),
          QA("chart_value", f"What is the value of {labels[pick]}?", str(values[pick]), len(VALUES)),
          QA("chart_title", "What is the title of the chart?", title, len(CHART_TITLES))]
    pairs = ", ".join(f"{lab} {v}" for lab, v in zip(labels, values))
    # The caption names the highest bar too: stage 1 (projector alone, the language model frozen) then has to carry
    # which bar is highest into the image tokens, not only the labels and values in order.
    caption = f"A {kind} chart titled {title}: {pairs}. Highest: {top}."
    return Sample("charts", image, caption, f"chart|{kind}|{title}|{pairs}", qa)


def _chart_key(sample: Sample) -> list[str]:
    """A chart's content key in its parts: "chart", kind ("bar" / "line"), title, "label value, ..." pairs."""
    parts = sample.key.split("|")
    if parts[0] != "chart" or len(parts) != 4:
        raise LigeroError(f"not a chart: {sample.key[:40]!r}")
    return parts


def chart_kind(sample: Sample) -> str:
    """"bar" or "line"."""
    return _chart_key(sample)[1]


def chart_values(sample: Sample) -> list[tuple[str, int]]:
    """(label, value) of a chart's bars or points, left to right, read back from its content key."""
    pairs = _chart_key(sample)[3]
    return [(label, int(value)) for label, value in (pair.rsplit(" ", 1) for pair in pairs.split(", "))]


# --- documents ---------------------------------------------------------------------------------------------------

DOC_SIZES = ((448, 224), (224, 448), (336, 224))


@lru_cache(maxsize=8)
def text_font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"  # DejaVu ships with matplotlib
    return ImageFont.truetype(str(folder / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")), size)


def document(rng: random.Random) -> Sample:
    width, height = rng.choice(DOC_SIZES)
    title = rng.choice(DOC_TITLES)
    names = rng.sample(sorted(FIELDS), 3)
    fields = {k: rng.choice(FIELDS[k]) for k in names}
    paper = tuple(rng.randint(235, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    size = 26 if width >= 336 else 22
    x, y = rng.randint(8, 24), rng.randint(8, 20)
    draw.text((x, y), title, fill=ink, font=text_font(size + 4, bold=True))
    step = (height - y - 40) // 3 if height > width else size + 14
    y += size + 18
    for k, v in fields.items():
        draw.text((x, y), f"{k}: {v}", fill=ink, font=text_font(size))
        y += step
    pick = rng.choice(names)
    qa = [QA("doc_field", f"What is the {pick} on the form?", fields[pick], len(FIELDS[pick])),
          QA("doc_title", "What is the title of the document?", title, len(DOC_TITLES))]
    body = ". ".join(f"{k}: {v}" for k, v in fields.items())
    return Sample("documents", image, f"A form titled {title}. {body}.", f"doc|{title}|{body}", qa)


# --- scenes ------------------------------------------------------------------------------------------------------


def scene(rng: random.Random) -> Sample:
    count, colour, shape = rng.randint(1, 6), rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (224, 224), background)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int]] = []
    while len(boxes) < count:  # non-overlapping places, radius 14-24 px
        r = rng.randint(14, 24)
        cx, cy = rng.randint(r + 4, 220 - r), rng.randint(r + 4, 220 - r)
        if all((cx - bx) ** 2 + (cy - by) ** 2 > (r + br + 6) ** 2 for bx, by, br in boxes):
            boxes.append((cx, cy, r))
    fill = COLOURS[colour]
    for cx, cy, r in boxes:
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(((cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)), fill=fill)
    plural = shape + ("s" if count > 1 else "")
    qa = [QA("scene_count", "How many shapes are there?", str(count), 6),
          QA("scene_colour", "What colour are the shapes?", colour, len(COLOURS)),
          QA("scene_shape", "What shape are they?", shape, len(SHAPES))]
    caption = f"{NUMBER_WORDS[count].capitalize()} {colour} {plural}."
    return Sample("scenes", image, caption, f"scene|{count}|{colour}|{shape}|{sorted(boxes)}", qa)


# --- emoji -------------------------------------------------------------------------------------------------------


def emoji_available() -> bool:
    return EMOJI_FONT.is_file()


@lru_cache(maxsize=1)
def emoji_names() -> tuple[tuple[str, str], ...]:
    """(character, lower-case Unicode name) of every single-code-point emoji the font draws, in code point order."""
    if not emoji_available():
        raise LigeroError(f"{EMOJI_FONT} is missing: install Debian's fonts-noto-color-emoji "
                          "(apt-get install fonts-noto-color-emoji) or leave out the emoji family")
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(EMOJI_FONT), lazy=True).getBestCmap()
    out = []
    for cp in sorted(cmap):
        if cp < 0x2000 or cp >= 0xE0000 or 0xFE00 <= cp <= 0xFE0F or 0x1F3FB <= cp <= 0x1F3FF \
                or 0x1F1E6 <= cp <= 0x1F1FF:
            continue  # text symbols, tags, variation selectors, skin-tone modifiers, regional indicator letters
        name = unicodedata.name(chr(cp), "")
        if name and "COMPONENT" not in name:
            out.append((chr(cp), name.lower()))
    return tuple(out)


def emoji_split(seed: int, held_out_share: float = 0.2) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) emoji: disjoint characters, fixed by the seed."""
    names = list(emoji_names())
    random.Random(f"emoji-split-{seed}").shuffle(names)
    cut = int(len(names) * held_out_share)
    return names[cut:], names[:cut]


@lru_cache(maxsize=1)
def _emoji_font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(EMOJI_FONT), EMOJI_SIZE)


def emoji_image(char: str, rng: random.Random) -> Image.Image:
    glyph = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((8, 8), char, font=_emoji_font(), embedded_color=True)
    box = glyph.getbbox() or (0, 0, 160, 160)
    glyph = glyph.crop(box)
    side = rng.randint(110, 190)
    scale = side / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))))
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (224, 224), background)
    image.paste(glyph, (rng.randint(0, 224 - glyph.width), rng.randint(0, 224 - glyph.height)), glyph)
    return image


def emoji(rng: random.Random, pool: list[tuple[str, str]]) -> Sample:
    char, name = rng.choice(pool)
    image = emoji_image(char, rng)
    options = [name] + [n for _, n in rng.sample(pool, 4) if n != name][:3]
    rng.shuffle(options)
    question = f"Which is shown: {', '.join(options[:-1])} or {options[-1]}?"
    return Sample("emoji", image, f"An emoji: {name}.", f"emoji|{char}", [QA("emoji_choice", question, name, 4)])


# --- sets --------------------------------------------------------------------------------------------------------


def _one(family: str, rng: random.Random, emoji_pool) -> Sample:
    if family == "charts":
        return chart(rng)
    if family == "documents":
        return document(rng)
    if family == "scenes":
        return scene(rng)
    if family == "emoji":
        return emoji(rng, emoji_pool)
    raise LigeroError(f"unknown task family '{family}'; use one of: {', '.join(FAMILIES)}")


def make_split(family: str, split: str, n: int, seed: int, exclude: set[str] | None = None) -> list[Sample]:
    """n samples of a family for split "train" or "heldout"; training samples whose content key is in `exclude`
    (the held-out keys) are skipped, so the splits never share an image's content."""
    if split not in ("train", "heldout"):
        raise LigeroError(f"unknown split '{split}'")
    pool = None
    if family == "emoji":
        train_pool, held_pool = emoji_split(seed)
        pool = train_pool if split == "train" else held_pool
    rng = random.Random(f"{family}-{split}-{seed}")
    out: list[Sample] = []
    exclude = exclude or set()
    while len(out) < n:
        s = _one(family, rng, pool)
        if s.key not in exclude:
            out.append(s)
    return out


def samples_digest(samples: list[Sample]) -> str:
    """sha256 over the samples' content keys, captions and questions (recorded with every result)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.key.encode())
        h.update(s.caption.encode())
        for q in s.qa:
            h.update(f"{q.kind}|{q.question}|{q.answer}".encode())
    return h.hexdigest()
