import pytest

from trainer.contract.labels import DEFAULT_CLASSES, ClassListError, label_from_path, parse_classes


@pytest.mark.parametrize(
    ("code", "label"),
    [("01", "neutral"), ("02", "calm"), ("03", "happy"), ("04", "sad"), ("05", "angry"),
     ("06", "fear"), ("07", "disgust"), ("08", "surprise")],
)
def test_ravdess_emotion_codes(code: str, label: str) -> None:
    info = label_from_path(f"ravdess_03-01-{code}-02-01-02-17.npz")
    assert (info.label, info.corpus, info.speaker, info.pattern) == (label, "ravdess", "17", "ravdess")


@pytest.mark.parametrize(
    ("code", "label"),
    [("NEU", "neutral"), ("HAP", "happy"), ("SAD", "sad"), ("ANG", "angry"), ("FEA", "fear"),
     ("DIS", "disgust")],
)
def test_cremad_emotion_codes(code: str, label: str) -> None:
    info = label_from_path(f"cremad_1025_TSI_{code}_XX.npz")
    assert (info.label, info.corpus, info.speaker, info.pattern) == (label, "cremad", "1025", "cremad")


def test_names_are_case_insensitive_and_prefix_optional() -> None:
    assert label_from_path("RAVDESS_03-01-05-01-01-01-24.NPY").label == "angry"
    assert label_from_path("CremaD_1091_ieo_hap_hi.npz").label == "happy"
    assert label_from_path("03-01-04-01-01-01-09.npz").speaker == "09"
    assert label_from_path("1001_DFA_SAD_XX.npy").label == "sad"


def test_suffixes_after_the_pattern_are_allowed() -> None:
    assert label_from_path("ravdess_03-01-06-01-01-01-02_take2.npz").label == "fear"
    assert label_from_path("cremad_1002_WSI_DIS_LO_wav2vec.npz").label == "disgust"


def test_file_name_beats_folder_and_folder_labels_others() -> None:
    assert label_from_path("sad/cremad_1001_TIE_ANG_HI.npz").label == "angry"
    folder = label_from_path("batch1/Happy/clip_007.npz")
    assert (folder.label, folder.corpus, folder.speaker) == ("happy", "folder", None)
    assert label_from_path("fearful/x.npy").label == "fear"


def test_unknown_code_and_unrecognised_name() -> None:
    unknown = label_from_path("cremad_1001_TIE_XYZ_HI.npz")
    assert unknown.label is None and unknown.code == "XYZ"
    assert label_from_path("ravdess_03-01-09-01-01-01-01.npz").label is None
    nothing = label_from_path("misc/recording.npz")
    assert (nothing.label, nothing.pattern) == (None, "none")
    # Too few tokens is no RAVDESS name.
    assert label_from_path("ravdess_03-01-05.npz").label is None


def test_parse_classes() -> None:
    assert parse_classes(None) == DEFAULT_CLASSES
    assert "surprise" not in DEFAULT_CLASSES and len(DEFAULT_CLASSES) == 7
    assert parse_classes(" Happy, sad ") == ("happy", "sad")
    with pytest.raises(ClassListError, match="unknown class 'joy'"):
        parse_classes("happy,joy")
    with pytest.raises(ClassListError):
        parse_classes("happy")
