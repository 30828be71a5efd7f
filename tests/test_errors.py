"""Errors from other processes, as text: which of them are the user's to fix (one line, exit 2)."""

from centernet_ray.errors import user_error_text


def test_an_error_line_is_the_user_s_when_it_names_a_user_input_error_or_a_missing_file():
    import centernet_ray.config  # noqa: F401 - as in the CLI, which has the config's errors imported

    assert user_error_text("centernet_ray.errors.UserInputError: /x/bad.pt is not a centernet-ray checkpoint") == \
        "/x/bad.pt is not a centernet-ray checkpoint"
    assert user_error_text("centernet_ray.config.schema.ConfigError: unknown key 'loss.alhpa'") == \
        "unknown key 'loss.alhpa'"  # a subclass, found in the module the line names
    assert user_error_text("FileNotFoundError: no checkpoint at /x/epoch_0003") == "no checkpoint at /x/epoch_0003"
    for fault in ("RuntimeError: CUDA error: an illegal memory access was encountered",
                  "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                  "centernet_ray.errors.NoSuchError: a class the module does not have",
                  "centernet_ray.no_such_module.UserInputError: a module that does not exist",
                  "evil.module.UserInputError: a module outside the project is not imported for a name",
                  "The actor's worker process was killed due to the node running low on memory."):
        assert user_error_text(fault) is None, fault
