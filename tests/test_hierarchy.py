"""Class hierarchies from config groups and from WordNet's data.noun (a hand-written one, and the real one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visae.data.fashion_mnist import CLASSES as FMNIST
from visae.data.hierarchy import FASHION_MNIST_GROUPS, ROOT, WORDNET_DIR, Hierarchy
from visae.errors import VisaeError

# (offset, words, [(pointer symbol, target offset)]): a little noun tree in WordNet's DAG shape.
SYNSETS = [
    ("00001740", ["entity"], [("~", "00015388")]),
    ("00015388", ["animal", "animate_being"], [("@", "00001740"), ("~", "02075296")]),
    ("02075296", ["carnivore"], [("@", "00015388")]),
    ("02083346", ["canine", "canid"], [("@", "02075296")]),
    ("02120997", ["feline", "felid"], [("@", "02075296")]),
    ("01317541", ["domestic_animal"], [("@", "00015388")]),
    # dog and cat list two hypernyms; the first-listed one is followed
    ("02084071", ["dog", "domestic_dog", "Canis_familiaris"], [("@", "02083346"), ("@", "01317541")]),
    ("02121808", ["domestic_cat", "house_cat"], [("@", "02120997"), ("@", "01317541")]),
    ("02113335", ["Lassie"], [("@i", "02084071")]),  # an instance: `@i`
    ("01317999", ["pet"], [("@", "01317541")]),
]
LICENCE = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
           "  2 Princeton University under the following license.  "]


def write_data_noun(folder: Path) -> Path:
    """SYNSETS as a data.noun in the WordNet 3.0 format (hex w_cnt, 3-digit p_cnt, gloss after |)."""
    lines = list(LICENCE)
    for offset, words, pointers in SYNSETS:
        word_part = " ".join(f"{w} 0" for w in words)
        ptr_part = " ".join(f"{sym} {target} n 0000" for sym, target in pointers)
        lines.append(f"{offset} 05 n {len(words):02x} {word_part} {len(pointers):03d} {ptr_part} | a gloss; \"with | bars\"  ")
    path = folder / "data.noun"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fmnist() -> Hierarchy:
    return Hierarchy.from_groups(FMNIST, FASHION_MNIST_GROUPS)


def test_groups_tree_coarse_depth_and_lca(fmnist):
    tshirt, trouser, pullover, sandal, sneaker = (FMNIST.index(n) for n in
                                                  ("T-shirt/top", "Trouser", "Pullover", "Sandal", "Sneaker"))
    assert fmnist.n_classes == 10
    assert [fmnist.coarse(c) for c in (tshirt, trouser, sandal)] == ["tops", "trousers", "footwear"]
    assert fmnist.coarse_names == ["tops", "trousers", "footwear", "bags"]
    assert fmnist.coarse_of.tolist() == [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]
    assert (fmnist.depth(tshirt), fmnist.depth("tops"), fmnist.depth(ROOT)) == (2, 1, 0)
    assert fmnist.lca_depth([tshirt]) == 2
    assert fmnist.lca_depth([tshirt, pullover, tshirt]) == 1
    assert fmnist.lca_depth([sandal, sneaker]) == 1
    assert fmnist.lca_depth([tshirt, pullover, sandal]) == 0
    assert fmnist.lca_depth_matrix.shape == (10, 10)
    desc = json.loads(json.dumps(fmnist.describe()))
    assert desc["kind"] == "groups" and desc["n_classes"] == 10 and desc["n_nodes"] == 15
    assert desc["coarse_groups"][2] == {"name": "footwear", "label": "footwear",
                                        "classes": ["Sandal", "Sneaker", "Ankle boot"]}


def test_flat_tree_has_one_group_per_class():
    flat = Hierarchy.flat(["a", "b", "c"])
    assert [flat.coarse(c) for c in range(3)] == ["a", "b", "c"]
    assert (flat.lca_depth([0]), flat.lca_depth([0, 2])) == (1, 0)


@pytest.mark.parametrize("groups, message", [
    ({"tops": ["T-shirt/top", "Jumper"]}, "class group 'tops' names unknown class 'Jumper'; classes: T-shirt/top, Trouser,"),
    ({**FASHION_MNIST_GROUPS, "bags": []}, "class group 'bags' must list one or more class names; got []"),
    ({k: v for k, v in FASHION_MNIST_GROUPS.items() if k != "bags"}, "class groups leave out 'Bag'; every class needs a group"),
    ({**FASHION_MNIST_GROUPS, "more": ["Bag"]}, "class 'Bag' is in two groups, 'bags' and 'more'; put it in one"),
    ({**{k: v for k, v in FASHION_MNIST_GROUPS.items() if k != "bags"}, "Bag": ["Bag"]},
     "class group name 'Bag' is also a class name"),
    (["tops"], "class groups must be a mapping"),
])
def test_groups_errors_name_the_problem(groups, message):
    with pytest.raises(VisaeError) as err:
        Hierarchy.from_groups(FMNIST, groups)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wordnet_follows_first_listed_hypernym(tmp_path):
    write_data_noun(tmp_path)
    classes = ["n02084071", "n02121808_domestic_cat", "n02113335 Lassie", "n01317999"]
    tree = Hierarchy.from_wordnet(classes, wordnet_dir=tmp_path, coarse_depth=2)
    assert tree.paths[0] == ("n00001740", "n00015388", "n02075296", "n02083346", "n02084071")
    assert tree.paths[2][-2:] == ("n02084071", "n02113335")  # the instance hangs under dog
    assert tree.paths[3] == ("n00001740", "n00015388", "n01317541", "n01317999")
    assert [tree.depth(c) for c in range(4)] == [4, 4, 5, 3]
    assert tree.lca_depth([0, 1]) == 2  # dog, cat: carnivore
    assert tree.lca_depth([0, 2]) == 4  # dog, Lassie: dog
    assert tree.lca_depth([1, 3]) == 1  # cat, pet: animal (cat's path goes through feline)
    assert [tree.coarse(c) for c in range(4)] == ["n02075296", "n02075296", "n02075296", "n01317541"]
    assert tree.labels["n02075296"] == "carnivore" and tree.labels["n02083346"] == "canine"
    desc = tree.describe()
    assert desc["path_rule"] == "first-listed hypernym" and desc["class_depth"] == {"min": 3, "max": 5}
    assert desc["coarse_groups"][0] == {"name": "n02075296", "label": "carnivore",
                                        "classes": ["n02084071", "n02121808_domestic_cat", "n02113335 Lassie"]}
    deep = Hierarchy.from_wordnet(classes, wordnet_dir=tmp_path, coarse_depth=9)
    assert deep.coarse(3) == "n01317999"  # shallower than coarse_depth: its own group


def test_wordnet_errors(tmp_path):
    with pytest.raises(VisaeError, match=r"data.noun is missing: apt-get install wordnet-base, or point"):
        Hierarchy.from_wordnet(["n02084071"], wordnet_dir=tmp_path)
    write_data_noun(tmp_path)
    with pytest.raises(VisaeError, match=r"class 'tench' is not named by a WordNet noun id"):
        Hierarchy.from_wordnet(["n02084071", "tench"], wordnet_dir=tmp_path)
    with pytest.raises(VisaeError, match=r"WordNet noun id n09999999 is not in .*data.noun"):
        Hierarchy.from_wordnet(["n09999999"], wordnet_dir=tmp_path)
    with pytest.raises(VisaeError, match=r"n02084071 names two classes"):
        Hierarchy.from_wordnet(["n02084071", "n02084071_dog"], wordnet_dir=tmp_path)
    with pytest.raises(VisaeError, match=r"coarse_depth must be an integer >= 1; got 0"):
        Hierarchy.from_wordnet(["n02084071"], wordnet_dir=tmp_path, coarse_depth=0)
    (tmp_path / "data.noun").write_text("02084071 05 n 01 dog 0 002 @ 02083346\n")
    with pytest.raises(VisaeError, match=r"line 1 is not a WordNet data line"):
        Hierarchy.from_wordnet(["n02084071"], wordnet_dir=tmp_path)


def test_real_wordnet_dog_and_cat_meet_at_carnivore():
    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip(f"{WORDNET_DIR}/data.noun is absent: apt-get install -y wordnet-base")
    tree = Hierarchy.from_wordnet(["n02084071", "n02121808", "n01440764_tench"])
    dog, cat = tree.paths[0], tree.paths[1]
    assert dog[0] == "n00001740" and tree.labels[dog[0]] == "entity"
    assert tree.labels[dog[tree.lca_depth([0, 1])]] == "carnivore"
    assert "placental" in {tree.labels[n] for n in set(dog) & set(cat)}
    assert tree.coarse(0) == tree.coarse(1) == tree.coarse(2) and tree.labels[tree.coarse(0)] == "animal"
