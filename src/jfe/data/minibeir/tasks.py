"""Build the queries and local pools of each MiniBEIR task from the parsed sources.

Everything here is in-memory and id-free: candidates are identified by their content (:class:`Cand`),
ids are assigned later in :mod:`jfe.data.minibeir.build` after sorting, which is what makes two builds
byte-identical.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from jfe.data.minibeir import templates as T
from jfe.data.minibeir.render import ImageRegistry
from jfe.data.minibeir.sources import LANGUAGE_NAMES, ClipArt, Emoji

_T = TypeVar("_T")

SplitFn = Callable[[str], str]


@dataclass(frozen=True)
class Cand:
    """A candidate by content; the same content in two tasks of one dataset is one candidate (one did)."""

    modality: str
    txt: str | None
    img: str | None
    base: str
    group: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.modality, self.img or "", self.txt or "")


@dataclass
class QSpec:
    """A query before ids are assigned."""

    task: int
    base: str
    txt: str | None
    img: str | None
    pos: Cand
    negs: list[Cand]
    src: dict[str, Any]
    exclude: list[Cand] = field(default_factory=list)

    @property
    def modality(self) -> str:
        return "image,text" if self.txt and self.img else ("image" if self.img else "text")

    @property
    def sort_key(self) -> tuple:
        return (self.task, self.base, self.img or "", self.txt or "", self.pos.key)


@dataclass
class TaskData:
    """The queries and the local pool of one (dataset, task)."""

    queries: list[QSpec] = field(default_factory=list)
    pool: dict[tuple, Cand] = field(default_factory=dict)

    def add_pool(self, *cands: Cand) -> None:
        for c in cands:
            self.pool.setdefault(c.key, c)


@dataclass(frozen=True)
class Edit:
    """One way to turn a reference into a target, with its wording."""

    kind: str
    target: Emoji
    non_additive: bool
    fill: dict[str, Any]


def _choice(rng: random.Random, options: Sequence[_T]) -> _T:
    return options[rng.randrange(len(options))]


def _phrase(table: dict[str, tuple[list[str], list[str]]], kind: str, fill: dict, rng: random.Random
            ) -> tuple[str, str]:
    main, heldout = table[kind]
    return _choice(rng, main).format(**fill), _choice(rng, heldout).format(**fill)


def _sample(items: list, cap: int | None, rng: random.Random) -> list:
    if cap is None or len(items) <= cap:
        return items
    idx = sorted(rng.sample(range(len(items)), cap))
    return [items[i] for i in idx]


def _sample_mixed(queries: list[QSpec], cap: int | None, rng: random.Random, share: float = 0.5) -> list[QSpec]:
    """Sample ``cap`` queries keeping at least ``share`` of them non-additive when there are enough."""
    if cap is None or len(queries) <= cap:
        return queries
    non = [q for q in queries if q.src["non_additive"]]
    add = [q for q in queries if not q.src["non_additive"]]
    n_non = min(len(non), max(round(cap * share), cap - len(add)))
    keep = {id(q) for q in _sample(non, n_non, rng) + _sample(add, cap - n_non, rng)}
    return [q for q in queries if id(q) in keep]


def _negs(cands: list[Cand], exclude: set, limit: int, rng: random.Random) -> list[Cand]:
    pool = [c for c in cands if c.key not in exclude]
    return sorted(_sample(pool, limit, rng), key=lambda c: c.key)


def _plural(n: int) -> dict[str, str]:
    return {"s": "" if n == 1 else "s", "es": "" if n == 1 else "es"}


# --------------------------------------------------------------------------------------------- emoji


class EmojiTasks:
    """Builds the eight emoji tasks."""

    def __init__(self, emoji: list[Emoji], images: ImageRegistry, split_of: SplitFn, seed: int,
                 caps: dict[int, int | None], max_negs: int = 10) -> None:
        self.emoji, self.images, self.split_of, self.seed = emoji, images, split_of, seed
        self.caps, self.max_negs = caps, max_negs
        self.by_group: dict[str, list[Emoji]] = defaultdict(list)
        self.by_attrs: dict[tuple, Emoji] = {}
        self.by_family: dict[tuple[str, tuple], Emoji] = {}
        for e in emoji:
            self.by_group[e.group].append(e)
            self.by_attrs[(e.base, e.skin, e.gender, e.hair, e.direction)] = e
            if e.family:
                self.by_family[(e.family, e.value)] = e

    def rng(self, task: int, salt: str = "") -> random.Random:
        return random.Random(f"{self.seed}:emoji:{task}:{salt}")

    # candidates -----------------------------------------------------------------------------------
    def img(self, e: Emoji) -> str:
        assert e.svg is not None, f"emoji {e.key} has no drawing"  # load_emoji keeps only drawn ones
        return self.images.svg(f"images/emoji/openmoji/{e.key}.png", e.svg)

    def c_img(self, e: Emoji) -> Cand:
        return Cand("image", None, self.img(e), e.base, e.group)

    def c_name(self, e: Emoji) -> Cand:
        return Cand("text", e.name, None, e.base, e.group)

    def c_pair(self, e: Emoji) -> Cand:
        return Cand("image,text", e.name, self.img(e), e.base, e.group)

    def build(self) -> dict[int, TaskData]:
        return {0: self.task_simple(0), 1: self.task_simple(1), 2: self.task_simple(2), 3: self.task_simple(3),
                4: self.task_simple(4), 6: self.task6(), 7: self.task_composed(7), 8: self.task_composed(8)}

    def task_simple(self, task: int) -> TaskData:
        """Tasks 0-4: one query per emoji variant, the positive is the same variant; pool = all variants."""
        rng = self.rng(task)
        make = {0: self.c_img, 1: self.c_name, 2: self.c_pair, 3: self.c_name, 4: self.c_img}[task]
        data = TaskData()
        data.add_pool(*(make(e) for e in self.emoji))
        queries = []
        for e in self.emoji:
            txt = img = None
            if task == 0:
                txt, mod = e.name, "name"
            elif task == 1:
                langs = sorted(e.labels)
                if not langs:
                    continue
                lang = _choice(rng, langs)
                txt, mod = e.labels[lang], f"translation_{lang}"
            elif task == 2:
                if not e.tags:
                    continue
                txt = "keywords: " + ", ".join(e.tags[:6]) + (f"; {e.qualifier}" if e.qualifier else "")
                mod = "keywords"
            elif task == 3:
                img, mod = self.img(e), "caption"
            else:
                styles = [s for s in ("google", "twitter") if getattr(e, s) is not None]
                if not styles:
                    continue
                style = _choice(rng, styles)
                img = self.images.raster(f"images/emoji/{style}/{e.key}.png", getattr(e, style))
                mod = f"style_{style}"
            pos = make(e)
            negs = _negs([make(o) for o in self.by_group[e.group]], {pos.key}, self.max_negs, rng)
            queries.append(QSpec(task, e.base, txt, img, pos, negs,
                                 {"base": e.base, "group": e.group, "modification": mod, "non_additive": False,
                                  "name": e.name}))
        data.queries = _sample(queries, self.caps.get(task), rng)
        return data

    # edits (tasks 7, 8 and the sequence questions of task 6) ----------------------------------------
    def _same_split(self, a: Emoji, b: Emoji | None) -> bool:
        return b is not None and b is not a and self.split_of(a.base) == self.split_of(b.base)

    def attr_edits(self, e: Emoji) -> list[Edit]:
        """Edits within one base: skin tone, gender, hair, direction (additive), and the non-additive
        relative ones (shade shift, gender flip, direction flip, two changes at once)."""
        out: list[Edit] = []
        cur = {"skin": e.skin, "gender": e.gender, "hair": e.hair, "direction": e.direction}

        def find(**change: Any) -> Emoji | None:
            a = {**cur, **change}
            return self.by_attrs.get((e.base, a["skin"], a["gender"], a["hair"], a["direction"]))

        singles: list[tuple[str, Any, Emoji, str]] = []  # (attribute, value, target, phrase)
        for skin in range(6):
            t = find(skin=skin)
            if skin != e.skin and t:
                out.append(Edit("skin_tone", t, False, {"skin": T.SKIN_PHRASE[skin], "short": T.SKIN_SHORT[skin]}))
                singles.append(("skin", skin, t, f"with {T.SKIN_PHRASE[skin]}"))
        if e.skin:
            for delta in (-2, -1, 1, 2):
                t = find(skin=e.skin + delta) if 1 <= e.skin + delta <= 5 else None
                if t:
                    n = abs(delta)
                    out.append(Edit("skin_shift", t, True, {"n": T.NUMBER_WORDS[n], "way": "darker" if delta > 0
                                                            else "lighter", **_plural(n)}))
        for g in ("person", "man", "woman"):
            t = find(gender=g) if e.gender and g != e.gender else None
            if t:
                out.append(Edit("gender", t, False, {"g": g}))
                singles.append(("gender", g, t, f"as a {g}"))
        if e.gender in ("man", "woman"):
            t = find(gender="woman" if e.gender == "man" else "man")
            if t:
                out.append(Edit("gender_flip", t, True, {}))
        for h in ("red hair", "curly hair", "white hair", "bald"):
            t = find(hair=h) if h != e.hair else None
            if t:
                out.append(Edit("hair", t, False, {"h": h}))
                singles.append(("hair", h, t, f"with {h}" if h != "bald" else "bald"))
        if e.direction:
            pointing = e.direction in ("up", "down") or e.base == "emoji:POINTING"
            verb = "pointing" if pointing else "facing"
            for d in ("left", "right", "up", "down"):
                t = find(direction=d) if d != e.direction else None
                if t:
                    out.append(Edit("direction", t, False, {"d": f"{verb} {d}"}))
                    singles.append(("direction", d, t, f"{verb} {d}"))
            opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[e.direction]
            t = find(direction=opposite)
            if t:
                out.append(Edit("direction_flip", t, True, {}))
        for i, (a1, v1, _, p1) in enumerate(singles):
            for a2, v2, _, p2 in singles[i + 1:]:
                if a1 != a2:
                    t = find(**{a1: v1, a2: v2})
                    if t:
                        out.append(Edit("two_changes", t, True, {"a": p1, "b": p2}))
        return out

    def family_edits(self, e: Emoji) -> list[Edit]:
        """Non-additive edits inside a sequence family; the target must fall in the reference's split."""
        out: list[Edit] = []
        fam, v = e.family, e.value

        def add(kind: str, value: tuple, fill: dict) -> None:
            t = self.by_family.get((fam, value))
            if t is not None and self._same_split(e, t):
                out.append(Edit(kind, t, True, fill))

        if fam == "clock":
            for delta in (30, 60, 90, 120, 180, 240, 300, -30, -60, -120, -180):
                h, m = divmod(abs(delta), 60)
                words = " and ".join(p for p in (f"{T.NUMBER_WORDS[h]} hour{'s' if h > 1 else ''}" if h else "",
                                                 "thirty minutes" if m else "") if p)
                if delta == 30:
                    words = "half an hour"
                add("clock_shift", ((v[0] + delta) % 720,),
                    {"t": words, "way": "later" if delta > 0 else "earlier", "signed": f"{delta:+d} minutes"})
        elif fam == "moon":
            steps = {1: "the next phase", -1: "the previous phase", 2: "two phases later", -2: "two phases earlier",
                     4: "the opposite phase"}
            for delta, step in steps.items():
                add("moon_step", ((v[0] + delta) % 8,), {"step": step})
        elif fam == "keycap":
            ops = [(f"plus {T.NUMBER_WORDS[k]}", v[0] + k) for k in (1, 2, 3)]
            ops += [(f"minus {T.NUMBER_WORDS[k]}", v[0] - k) for k in (1, 2, 3)]
            ops += [("doubled", v[0] * 2), ("halved", v[0] // 2 if v[0] % 2 == 0 else -1)]
            for op, value in ops:
                if 0 <= value <= 10 and value != v[0]:
                    add("keycap_arith", (value,), {"op": op})
        elif fam == "colour":
            colour, shape = v
            for (f2, value), t in self.by_family.items():
                if f2 != "colour" or value == v or not self._same_split(e, t):
                    continue
                c2, s2 = value
                if s2 == shape:
                    out.append(Edit("colour_swap", t, True, {"c": c2}))
                elif c2 == colour:
                    out.append(Edit("shape_swap", t, True, {"sh": s2}))
                else:
                    out.append(Edit("colour_shape_swap", t, True, {"c": c2, "sh": s2}))
        elif fam == "arrow":
            for delta in (1, 2, 3, 4, -1, -2, -3):
                add("arrow_rotate", ((v[0] + delta) % 8,),
                    {"deg": abs(delta) * 45, "dir": "clockwise" if delta > 0 else "anticlockwise"})
        return out

    def edits(self, e: Emoji) -> list[Edit]:
        return self.family_edits(e) if e.family else self.attr_edits(e)

    def task_composed(self, task: int) -> TaskData:
        """Tasks 7 (-> image) and 8 (-> image+name): reference emoji + modification text."""
        rng = self.rng(task)
        make = self.c_img if task == 7 else self.c_pair
        data = TaskData()
        data.add_pool(*(make(e) for e in self.emoji))
        queries = []
        per_ref = 2 if task == 7 else 1
        for e in self.emoji:
            options = self.edits(e)
            by_kind: dict[str, list[Edit]] = defaultdict(list)
            for ed in options:
                by_kind[ed.kind].append(ed)
            kinds = sorted(by_kind)
            rng.shuffle(kinds)
            # different edit types per reference, a random edit of each type; the few sequence-family members
            # (clocks, moons, keycaps, shapes, arrows) get several edits each so that these are not too rare
            chosen = (_sample(options, 3 * per_ref, rng) if e.family
                      else [_choice(rng, by_kind[k]) for k in kinds[:per_ref]])
            for ed in chosen:
                kind = ed.kind
                txt, heldout = _phrase(T.EDITS, kind, ed.fill, rng)
                pos, ref = make(ed.target), make(e)
                negs = _negs([make(o) for o in self.by_group[e.group]], {pos.key}, self.max_negs, rng)
                queries.append(QSpec(task, e.base, txt, self.img(e), pos, negs, {
                    "base": e.base, "group": e.group, "modification": kind, "non_additive": ed.non_additive,
                    "reference": e.name, "target": ed.target.name, "query_txt_heldout": heldout,
                }, exclude=[ref]))
        data.queries = _sample_mixed(queries, self.caps.get(task), rng)
        return data

    # task 6 -----------------------------------------------------------------------------------------
    def _vocab(self, kind: str, text: str) -> Cand:
        return Cand("text", text, None, f"vocab:{kind}", f"vocab:{kind}")

    def role_of(self, e: Emoji) -> str:
        """The activity / job of a person emoji: its gender-neutral name without "person"."""
        neutral = self.by_attrs.get((e.base, 0, "person" if e.gender else "", "", "left" if e.direction in
                                     ("left", "right") else e.direction))
        name = (neutral or e).name.partition(":")[0]
        for lead in ("person ", "man ", "woman "):
            if name.startswith(lead):
                return name[len(lead):]
        return "" if name in ("person", "man", "woman") else name

    def _attribute_answers(self, e: Emoji) -> list[tuple[str, Cand]]:
        """(question kind, answer) for each attribute the image shows: skin, gender, hair, direction, role."""
        attrs: list[tuple[str, Cand]] = []
        if e.skin:
            attrs.append(("ask_skin", self._vocab("skin", T.SKIN_PHRASE[e.skin])))
        if e.gender:  # "a man", not "man": the bare word is the name of the emoji "man" (another answer)
            attrs.append(("ask_gender", self._vocab("gender", f"a {e.gender}")))
        if e.hair:
            attrs.append(("ask_hair", self._vocab("hair", e.hair)))
        if e.direction:
            verb = "pointing" if e.base == "emoji:POINTING" else "facing"
            attrs.append(("ask_direction", self._vocab("direction", f"{verb} {e.direction}")))
        role = self.role_of(e) if len(attrs) >= 1 and e.gender else ""
        if role:  # the role belongs to the base ("farmer" is also the neutral variant's name)
            attrs.append(("ask_role", Cand("text", role, None, e.base, e.group)))
        return attrs

    def _question_options(self, e: Emoji, lang_codes: tuple[str, ...], rng: random.Random
                          ) -> list[tuple[str, Cand, list[Cand], dict, bool]]:
        """Every question task 6 could ask about ``e``: (kind, answer, negatives, fill, non-additive).
        Draws from ``rng`` (the language), so it must be called in the same order on every build."""
        options: list[tuple[str, Cand, list[Cand], dict, bool]] = []
        langs = [lang for lang in lang_codes if lang in e.labels]
        if langs:
            lang = _choice(rng, langs)
            ans = Cand("text", e.labels[lang], None, e.base, e.group)
            negs = [Cand("text", e.labels[x], None, e.base, e.group) for x in langs if x != lang]
            negs += [Cand("text", o.labels[lang], None, o.base, o.group) for o in self.by_group[e.group]
                     if o is not e and lang in o.labels]
            options.append(("name_in_language", ans, negs, {"lang": LANGUAGE_NAMES[lang]}, False))
        if e.subgroup:
            answer = self._vocab("category", e.subgroup.replace("-", " ") + " emoji")
            options.append(("category", answer, [], {}, False))
        attrs = self._attribute_answers(e)
        if len(attrs) >= 2:  # only images with several attributes: the other attributes are hard negatives
            for kind, ans in attrs:
                others = [a for k, a in attrs if k != kind]
                options.append((kind, ans, others, {}, True))
        if e.family:
            for ed in self.family_edits(e):
                if ed.kind in T.QUESTIONS:
                    negs = [self.c_name(o) for o in self.by_group[e.group]]
                    options.append((ed.kind, self.c_name(ed.target), negs, ed.fill, True))
        return options

    def task6(self) -> TaskData:
        """Image + question -> answer text. Answers: names in another language (hard negatives: the other
        languages and the other variants), per-image attribute questions whose hard negatives are the image's
        other attributes, and sequence questions over the families."""
        rng = self.rng(6)
        data = TaskData()
        lang_codes = ("de",)  # one language keeps the pool at a few thousand answers
        # the pool: every variant's name in the asked languages, the families' names, the attribute vocabulary
        for e in self.emoji:
            for lang in lang_codes:
                if lang in e.labels:
                    data.add_pool(Cand("text", e.labels[lang], None, e.base, e.group))
            if e.family:
                data.add_pool(self.c_name(e))
        queries: list[QSpec] = []
        for e in self.emoji:
            options = self._question_options(e, lang_codes, rng)
            for _kind, ans, negs, _fill, _ in options:
                data.add_pool(ans, *negs)
            if not options:
                continue
            # up to two questions per image: prefer per-image (non-additive) ones when present
            rng.shuffle(options)
            options.sort(key=lambda o: not o[4])
            for kind, ans, negs, fill, non_add in options[:2]:
                txt, heldout = _phrase(T.QUESTIONS, kind, fill, rng)
                negs = _negs(negs, {ans.key}, self.max_negs, rng)
                queries.append(QSpec(6, e.base, txt, self.img(e), ans, negs, {
                    "base": e.base, "group": e.group, "modification": kind, "non_additive": non_add,
                    "reference": e.name, "query_txt_heldout": heldout,
                }))
        data.queries = _sample_mixed(queries, self.caps.get(6), rng)
        return data

# ------------------------------------------------------------------------------------------ clip-art


class ClipArtTasks:
    """Builds clip-art tasks 0-3 (no fusion on the query side; task 2 has image+title candidates)."""

    def __init__(self, drawings: list[ClipArt], images: ImageRegistry, seed: int, caps: dict[int, int | None],
                 max_negs: int = 10) -> None:
        self.drawings, self.images, self.seed, self.caps, self.max_negs = drawings, images, seed, caps, max_negs
        self.by_group: dict[str, list[ClipArt]] = defaultdict(list)
        for d in drawings:
            self.by_group[d.category].append(d)

    @staticmethod
    def base(d: ClipArt) -> str:
        return f"clipart:{d.path}"

    def img(self, d: ClipArt) -> str:
        return self.images.raster(f"images/clipart/{d.path}.png", d.png, margin=0.04)

    def build(self) -> dict[int, TaskData]:
        return {t: self.task(t) for t in (0, 1, 2, 3)}

    def task(self, task: int) -> TaskData:
        rng = random.Random(f"{self.seed}:clipart:{task}")

        def make(d: ClipArt) -> Cand:
            b, g = self.base(d), f"clipart-category:{d.category}"
            if task == 0:
                return Cand("image", None, self.img(d), b, g)
            if task == 2:
                return Cand("image,text", d.title, self.img(d), b, g)
            return Cand("text", d.title, None, b, g)

        data = TaskData()
        data.add_pool(*(make(d) for d in self.drawings))
        queries = []
        for d in self.drawings:
            txt = img = None
            keywords = ", ".join(d.keywords[:6])
            if task in (1, 2) and len(d.keywords) < 2 and not (task == 1 and d.description):
                continue  # a single keyword ("bird") fits hundreds of drawings: not a fair query
            if task == 0:
                txt, mod = d.title, "title"
            elif task == 1:
                txt, mod = (d.description, "description") if d.description else (f"keywords: {keywords}",
                                                                                  "keywords")
            elif task == 2:
                txt, mod = f"keywords: {keywords}", "keywords"
            else:
                img, mod = self.img(d), "caption"
            pos = make(d)
            negs = _negs([make(o) for o in self.by_group[d.category]], {pos.key}, self.max_negs, rng)
            queries.append(QSpec(task, self.base(d), txt, img, pos, negs,
                                 {"base": self.base(d), "group": pos.group, "modification": mod,
                                  "non_additive": False, "title": d.title}))
        data.queries = _sample(queries, self.caps.get(task), rng)
        return data
