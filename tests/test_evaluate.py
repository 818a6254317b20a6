import torch

from synthaug.classify import classification_metrics


def test_known_answers():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2])
    m = classification_metrics(preds, labels, class_names=["a", "b", "c"], train_counts=torch.tensor([500, 50, 5]))
    assert abs(m["accuracy"] - 6 / 8) < 1e-6
    assert abs(m["balanced_accuracy"] - (0.75 + 0.5 + 1.0) / 3) < 1e-6
    assert m["per_class_accuracy"] == {"a": 0.75, "b": 0.5, "c": 1.0}
    assert m["worst_class_accuracy"] == 0.5
    assert m["shot_thresholds"] == {"many_above": 100.0, "few_below": 20.0}
    assert (m["many_shot_accuracy"], m["medium_shot_accuracy"], m["few_shot_accuracy"]) == (0.75, 0.5, 1.0)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]


def test_custom_thresholds_and_empty_groups():
    labels = preds = torch.tensor([0, 1])
    m = classification_metrics(preds, labels, class_names=["a", "b"], train_counts=torch.tensor([30, 10]),
                               many_threshold=20, few_threshold=5)
    assert m["many_shot_classes"] == 1 and m["medium_shot_classes"] == 1 and m["few_shot_accuracy"] is None


def test_worst_group():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    groups = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    preds = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0])
    m = classification_metrics(preds, labels, class_names=["a", "b"], groups=groups)
    assert m["worst_group_accuracy"] == 0.0 and m["worst_group"] == {"class": "b", "group": 1}
    assert abs(m["mean_group_accuracy"] - (1 + 0.5 + 1 + 0) / 4) < 1e-6
    assert m["group_accuracy"] == {"a": {"0": 1.0, "1": 0.5}, "b": {"0": 1.0, "1": 0.0}}
