"""The HTML forms (Flask-WTF, so each carries a CSRF token).

They check only what a browser can get wrong in form encoding (a number field holding text);
the limits are checked by core, and its JobRequestError / TrainingRequestError lands next to the
field it names (:func:`attach_error`).
"""

from __future__ import annotations

from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from wtforms import (
    BooleanField,
    FloatField,
    IntegerField,
    PasswordField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms.validators import InputRequired, Optional

from core.services.jobs import SAMPLER_NAMES


class GenerateForm(FlaskForm):
    prompt = TextAreaField("Prompt", validators=[InputRequired("Type a prompt.")])
    # The choices are the servable models, set per request (web.pages); core checks the name.
    model = SelectField(
        "Model", choices={"default": "default"}, default="default", validate_choice=False
    )
    negative_prompt = TextAreaField("Negative prompt", validators=[Optional()])
    steps = IntegerField("Steps", validators=[InputRequired("Give a number of steps.")])
    guidance = FloatField("Guidance", validators=[InputRequired("Give a guidance scale.")])
    sampler = SelectField("Sampler", choices={name: name for name in SAMPLER_NAMES})
    seed = IntegerField("Seed", validators=[Optional()], description="Empty: a random seed.")
    num_images = IntegerField("Images", default=1, validators=[InputRequired("How many images?")])
    init_image = FileField(
        "Start from an image",
        description="Optional: PNG, JPEG or WebP; the prompt then edits it (image-to-image).",
    )
    mask = FileField(
        "Mask",
        description="Optional, with an image of the same size: white is repainted, black kept.",
    )
    strength = FloatField(
        "Strength",
        validators=[Optional()],
        description="How much of the image is redrawn: low keeps it, 1 redraws it all.",
    )
    one_per_line = BooleanField(
        "One prompt per line",
        description="Each line becomes its own job, all in one batch (seeds follow on from the "
        "seed).",
    )


class SignInForm(FlaskForm):
    token = PasswordField("Token", validators=[InputRequired("Paste your token.")])


class AdminSignInForm(SignInForm):
    token = PasswordField("Admin token", validators=[InputRequired("Paste an admin token.")])


class TrainingRunForm(FlaskForm):
    kind = SelectField("Model", choices={"denoiser": "denoiser", "autoencoder": "autoencoder"})
    dataset_kind = SelectField(
        "Dataset",
        choices={
            "shapes": "built-in shapes",
            "s3": "s3:// prefix",
            "path": "folder under the data root",
        },
    )
    dataset_location = StringField(
        "Location", validators=[Optional()], description="s3://BUCKET/PREFIX, or a relative path."
    )
    shapes_seed = IntegerField("Shapes seed", validators=[Optional()])
    steps = IntegerField("Steps", validators=[Optional()])
    batch_size = IntegerField("Batch size", validators=[Optional()])
    lr = FloatField("Learning rate", validators=[Optional()])
    seed = IntegerField("Training seed", validators=[Optional()])
    config_json = TextAreaField(
        "More overrides (JSON)",
        validators=[Optional()],
        description='e.g. {"unet": {"channels": [64, 128]}, "train": {"warmup_steps": 100}}',
    )
    autoencoder_version_id = SelectField("Autoencoder", choices={"": "the shipped one"})
    base_version = SelectField(
        "Start from",
        choices={"": "nothing: train from scratch"},
        validators=[Optional()],  # a form posted without it trains from scratch
        description="A denoiser to fine-tune (configs/finetune.toml), with its autoencoder.",
    )
    freeze_text_encoder = BooleanField("Fine-tune the UNet alone (freeze the text encoder)")
    activate = BooleanField("Serve the result when it finishes")


# Where core's field names (dataset.uri, config.train.lr …) show up on the run form.
RUN_FIELD_FOR_ERROR = {
    "kind": "kind",
    "dataset.kind": "dataset_kind",
    "dataset.uri": "dataset_location",
    "dataset.path": "dataset_location",
    "dataset.seed": "shapes_seed",
    "config.train.steps": "steps",
    "config.train.batch_size": "batch_size",
    "config.train.lr": "lr",
    "config.train.seed": "seed",
    "autoencoder_version_id": "autoencoder_version_id",
    "base_version": "base_version",
    "freeze_text_encoder": "freeze_text_encoder",
    "activate": "activate",
}


def attach_error(form: FlaskForm, field: str, message: str) -> None:
    """Show ``message`` next to ``field`` (or at the top of the form when it has no field)."""
    target = getattr(form, field, None)
    if target is not None and hasattr(target, "errors"):
        target.errors = [*target.errors, message]
    else:
        form.form_errors.append(f"{field}: {message}")
