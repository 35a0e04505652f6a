"""Every registered model refuses options its builder does not take, naming them and listing the
valid ones (no builder swallows unknown keywords)."""
import pytest

import models
from models import ALIASES


@pytest.mark.parametrize("name", models.available())
def test_unknown_option_is_refused_naming_it_and_the_valid_ones(name):
    with pytest.raises(models.UnknownModelOption) as e:
        models.build(name, foo=1)
    msg = str(e.value)
    assert "unknown option 'foo'" in msg and repr(name) in msg, msg
    assert "its options: " in msg and "t1" in msg.split("its options: ")[1], msg
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)   # either kind is caught


def test_a_close_misspelling_is_pointed_out():
    with pytest.raises(TypeError, match=r"unknown options 'bar', 'hiden' \(did you mean 'hidden'\?\) for model "
                                        r"'digits'; its options: .*hidden"):
        models.build("digits", hiden=32, bar=1)


@pytest.mark.parametrize("builder", [models.digits_ffebm, models.digits_dhn, models.vgg_ffebm, models.published_ffebm])
def test_builders_called_directly_refuse_unknown_keywords(builder):
    with pytest.raises(TypeError, match="foo"):
        builder(foo=1)


@pytest.mark.parametrize("name", ["digits", "dhn_digits", "splitting_small_3block", "cifar100_l15_6blocks",
                                  next(iter(ALIASES))])
def test_the_listed_options_are_what_the_builder_takes(name):
    import inspect

    fn = {"digits": models.digits_ffebm, "dhn_digits": models.digits_dhn,
          "cifar100_l15_6blocks": models.vgg_ffebm}.get(name, models.published_ffebm)
    assert models.options(name) == set(inspect.signature(fn).parameters) | {"dtype"}
