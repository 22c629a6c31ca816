"""Class hierarchies: which fine classes belong together, so a latent can be called abstract.

A hierarchy is a tree whose leaves (or nodes) are a dataset's fine classes, stored as one
root-to-class path per class. It comes from the config as groups (`{group: [class names]}`, a
two-level tree: root -> group -> class), or, for ImageNet-1k, from WordNet's noun database read
offline (`data.noun`, as Debian's `wordnet-base` installs it). The abstraction analysis needs
only each class's coarse group and the depth of the lowest common ancestor of a set of classes.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

import numpy as np

from visae.errors import VisaeError

ROOT = "(root)"  # the root of a config-built tree; parentheses keep it apart from class names
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_COARSE_DEPTH = 6  # entity=0 ... depth 6 holds e.g. animal, device, conveyance, container, clothing
HYPERNYMS = ("@", "@i")  # WordNet pointer symbols: hypernym, instance hypernym
WNID = re.compile(r"n(\d{8})(?![0-9A-Za-z])")  # `n01440764`, optionally followed by `_tench`, ` tench`, ...

FASHION_MNIST_GROUPS = {
    "tops": ["T-shirt/top", "Pullover", "Dress", "Coat", "Shirt"],
    "trousers": ["Trouser"],
    "footwear": ["Sandal", "Sneaker", "Ankle boot"],
    "bags": ["Bag"],
}


class Hierarchy:
    """A tree over fine classes: `paths[i]` names the nodes from the root to class i.

    `coarse_depth` is the depth (root = 0) of the node that is a class's coarse group; a class
    shallower than that is its own coarse group. `labels` maps node names to readable labels.
    """

    def __init__(self, classes: list[str], paths: list[tuple[str, ...]], coarse_depth: int, *, kind: str,
                 source: str, labels: dict[str, str] | None = None):
        if len(paths) != len(classes):
            raise ValueError(f"{len(classes)} classes but {len(paths)} paths")
        if len({p[0] for p in paths}) > 1:
            raise VisaeError(f"{kind} hierarchy from {source} is not one tree: its classes reach the roots "
                             f"{', '.join(sorted({p[0] for p in paths}))}")
        self.classes = list(classes)
        self.paths = [tuple(p) for p in paths]
        self.coarse_depth = int(coarse_depth)
        self.kind = kind
        self.source = source
        self.labels = dict(labels or {})
        self._node_depth = {node: d for path in self.paths for d, node in enumerate(path)}
        coarse_nodes = [path[min(self.coarse_depth, len(path) - 1)] for path in self.paths]
        self.coarse_names = list(dict.fromkeys(coarse_nodes))  # in order of first class
        index = {name: i for i, name in enumerate(self.coarse_names)}
        self.coarse_of = np.array([index[n] for n in coarse_nodes], dtype=np.int64)

    @classmethod
    def from_groups(cls, classes: list[str], groups: dict[str, list[str]]) -> Hierarchy:
        """Root -> group -> class, from the config's `{group_name: [class names]}`; every class
        must be in exactly one group."""
        if not isinstance(groups, dict) or not groups:
            raise VisaeError(f"class groups must be a mapping {{group: [class names]}}; got {groups!r}")
        allowed = ", ".join(classes)
        group_of: dict[str, str] = {}
        for group, members in groups.items():
            if not isinstance(members, list) or not members:
                raise VisaeError(f"class group {group!r} must list one or more class names; got {members!r}")
            if group in classes or group == ROOT:
                raise VisaeError(f"class group name {group!r} is also a class name; give the group another name")
            for name in members:
                if name not in classes:
                    raise VisaeError(f"class group {group!r} names unknown class {name!r}; classes: {allowed}")
                if name in group_of:
                    raise VisaeError(f"class {name!r} is in two groups, {group_of[name]!r} and {group!r}; "
                                     "put it in one")
                group_of[name] = group
        missing = [c for c in classes if c not in group_of]
        if missing:
            raise VisaeError(f"class groups leave out {', '.join(map(repr, missing))}; every class needs a group "
                             f"(classes: {allowed})")
        paths = [(ROOT, group_of[c], c) for c in classes]
        return cls(classes, paths, coarse_depth=1, kind="groups", source="config")

    @classmethod
    def flat(cls, classes: list[str]) -> Hierarchy:
        """Root -> class, for a dataset without groups: each class is its own coarse group, so no
        latent can be abstract."""
        return cls(classes, [(ROOT, c) for c in classes], coarse_depth=1, kind="flat", source="none")

    @classmethod
    def from_wordnet(cls, classes: list[str], wordnet_dir: str | Path = WORDNET_DIR,
                     coarse_depth: int = WORDNET_COARSE_DEPTH) -> Hierarchy:
        """ImageNet-style classes named by WordNet noun ids (`n01440764`, optionally followed by a
        label: `n01440764_tench`), each placed on one hypernym path up to `entity`.

        WordNet is a DAG; the path follows, from each synset, the first hypernym pointer
        (`@` or `@i`) its `data.noun` line lists.
        """
        if isinstance(coarse_depth, bool) or not isinstance(coarse_depth, int) or coarse_depth < 1:
            raise VisaeError(f"WordNet coarse_depth must be an integer >= 1; got {coarse_depth!r}")
        offsets = []
        for name in classes:
            match = WNID.match(name)
            if not match:
                raise VisaeError(f"class {name!r} is not named by a WordNet noun id (like n01440764 or "
                                 "n01440764_tench); a WordNet hierarchy needs ImageNet-style class names")
            offsets.append(match.group(1))
        if len(set(offsets)) < len(offsets):
            dup = next(o for o in offsets if offsets.count(o) > 1)
            raise VisaeError(f"WordNet noun id n{dup} names two classes; each class needs its own id")
        path = Path(wordnet_dir) / "data.noun"
        synsets = read_wordnet_nouns(path)
        paths = [tuple(f"n{o}" for o in reversed(_hypernym_path(o, synsets, path))) for o in offsets]
        labels = {node: synsets[node[1:]][0] for p in paths for node in p}
        return cls(classes, paths, coarse_depth, kind="wordnet", source=str(path), labels=labels)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def coarse(self, class_id: int) -> str:
        """The coarse group of a fine class: its group, or its ancestor at `coarse_depth`."""
        return self.coarse_names[self.coarse_of[class_id]]

    def depth(self, node: int | str) -> int:
        """Depth (root = 0) of a fine class (an int class id) or of a node (its name)."""
        if isinstance(node, str):
            if node not in self._node_depth:
                raise KeyError(f"no node {node!r} in this hierarchy")
            return self._node_depth[node]
        return len(self.paths[node]) - 1

    @cached_property
    def lca_depth_matrix(self) -> np.ndarray:
        """int64 [C, C]: depth of the lowest common ancestor of each pair of fine classes (the
        diagonal is each class's own depth)."""
        names = {node: i for i, node in enumerate(self._node_depth)}
        width = max(len(p) for p in self.paths)
        ids = np.full((self.n_classes, width), -1, dtype=np.int64)
        for i, path in enumerate(self.paths):
            ids[i, :len(path)] = [names[n] for n in path]
        shared = np.ones((self.n_classes, self.n_classes), dtype=bool)
        depth = np.full((self.n_classes, self.n_classes), -1, dtype=np.int64)
        for level in ids.T:  # one depth at a time: [C, C] memory, not [C, C, depth]
            shared &= (level[:, None] == level[None, :]) & (level[:, None] >= 0)
            depth += shared
        return depth

    def lca_depth(self, class_ids) -> int:
        """Depth of the lowest common ancestor of a non-empty set of fine classes (root = 0)."""
        ids = np.unique(np.asarray(class_ids, dtype=np.int64))
        if ids.size == 0:
            raise ValueError("lca_depth needs at least one class")
        # In a tree every pairwise ancestor with one member lies on that member's path; the
        # set's ancestor is the shallowest of them.
        return int(self.lca_depth_matrix[ids[0], ids].min())

    def describe(self) -> dict:
        """A JSON-able summary: where the tree comes from, its size, and each coarse group's classes."""
        groups = {name: [] for name in self.coarse_names}
        for c, g in enumerate(self.coarse_of):
            groups[self.coarse_names[g]].append(self.classes[c])
        depths = [len(p) - 1 for p in self.paths]
        return {
            "kind": self.kind,
            "source": self.source,
            "path_rule": "first-listed hypernym" if self.kind == "wordnet" else "config groups",
            "n_classes": self.n_classes,
            "n_nodes": len(self._node_depth),
            "coarse_depth": self.coarse_depth,
            "class_depth": {"min": min(depths), "max": max(depths)},
            "coarse_groups": [{"name": name, "label": self.labels.get(name, name), "classes": members}
                              for name, members in groups.items()],
        }


def read_wordnet_nouns(path: Path) -> dict[str, tuple[str, list[str]]]:
    """WordNet 3.0 `data.noun` -> {offset: (first lemma, [hypernym offsets in listed order])}.

    Each data line is `offset lex_filenum ss_type w_cnt (word lex_id)*w_cnt p_cnt
    (ptr_symbol offset pos source/target)*p_cnt [frames] | gloss`; w_cnt is hexadecimal,
    p_cnt decimal. The licence header's lines start with spaces. Synsets are keyed by their
    offset field; the file is parsed whole (about half a second), not seeked by byte offset.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError as err:
        raise VisaeError(f"WordNet noun database {path} is missing: apt-get install wordnet-base, or point the "
                         "hierarchy's wordnet_dir at a folder holding data.noun") from err
    synsets = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith(" "):
            continue
        head = line.split("|", 1)[0].split()
        try:
            n_words = int(head[3], 16)
            at = 4 + 2 * n_words
            n_pointers = int(head[at])
            pointers = head[at + 1:at + 1 + 4 * n_pointers]
            if len(pointers) != 4 * n_pointers:
                raise ValueError("fewer pointers than p_cnt")
            hypernyms = [pointers[j + 1] for j in range(0, len(pointers), 4)
                         if pointers[j] in HYPERNYMS and pointers[j + 2] == "n"]
            synsets[head[0]] = (head[4].replace("_", " "), hypernyms)
        except (IndexError, ValueError) as err:
            raise VisaeError(f"{path} line {number} is not a WordNet data line ({err}): {line[:60]!r}") from err
    return synsets


def _hypernym_path(offset: str, synsets: dict, path: Path) -> list[str]:
    """Offsets from a synset up to its root, following the first-listed hypernym."""
    if offset not in synsets:
        raise VisaeError(f"WordNet noun id n{offset} is not in {path}")
    chain = [offset]
    while synsets[chain[-1]][1]:
        parent = synsets[chain[-1]][1][0]
        if parent not in synsets:
            raise VisaeError(f"{path}: synset {chain[-1]} points to hypernym {parent}, which it does not hold")
        if parent in chain:
            raise VisaeError(f"{path}: the hypernyms of n{offset} form a cycle at {parent}")
        chain.append(parent)
    return chain
