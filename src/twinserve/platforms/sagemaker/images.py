"""The Hugging Face LLM DLC (TGI) image of a region, and the region's SageMaker URLs.

The DLC is published by AWS in one ECR registry per region: account 763104351884 in most
regions, a region's own account in the opt-in regions, China and GovCloud. The table and the
tags are those of the SageMaker Python SDK's `image_uri_config/huggingface-llm.json` (the
`huggingface-llm` framework of `sagemaker.image_uris.retrieve`), for the recent TGI releases:
the tag pins the TGI version, PyTorch, CUDA and the DLC build, so a re-deploy runs the same
image. `SageMakerSettings.image` replaces all of this with any ECR URI (bring your own
container); `tgi_version` picks another row.

ISO partitions (us-iso*, us-isob*) are left out: their registries need their own endpoints.
"""

from __future__ import annotations

from twinserve.errors import ValidationError

REPOSITORY = "huggingface-pytorch-tgi-inference"
_DEFAULT_ACCOUNT = "763104351884"
# region → account of its DLC registry (sagemaker-python-sdk huggingface-llm.json, 2026-08)
DLC_ACCOUNTS: dict[str, str] = {
    **{
        r: _DEFAULT_ACCOUNT
        for r in (
            "us-east-1",
            "us-east-2",
            "us-west-1",
            "us-west-2",
            "ca-central-1",
            "sa-east-1",
            "eu-central-1",
            "eu-north-1",
            "eu-west-1",
            "eu-west-2",
            "eu-west-3",
            "ap-northeast-1",
            "ap-northeast-2",
            "ap-south-1",
            "ap-southeast-1",
            "ap-southeast-2",
        )
    },  # fmt: skip
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-east-2": "975050140332",
    "ap-northeast-3": "364406365360",
    "ap-south-2": "772153158452",
    "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322",
    "ap-southeast-5": "550225433462",
    "ap-southeast-6": "633930458069",
    "ap-southeast-7": "590183813437",
    "ca-west-1": "204538143572",
    "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807",
    "eu-central-2": "380420809688",
    "eu-south-1": "692866216735",
    "eu-south-2": "503227376785",
    "il-central-1": "780543022126",
    "me-central-1": "914824155844",
    "me-south-1": "217643126080",
    "mx-central-1": "637423239942",
    "us-gov-east-1": "446045086412",
    "us-gov-west-1": "442386744353",
}
# TGI version → the DLC's exact tag (PyTorch, TGI, python, CUDA, OS and DLC build)
TGI_TAGS: dict[str, str] = {
    "3.3.6": "2.7.0-tgi3.3.6-gpu-py311-cu124-ubuntu22.04",
    "3.2.3": "2.6.0-tgi3.2.3-gpu-py311-cu124-ubuntu22.04",
    "3.1.1": "2.6.0-tgi3.1.1-gpu-py311-cu124-ubuntu22.04",
    "3.0.1": "2.4.0-tgi3.0.1-gpu-py311-cu124-ubuntu22.04-v2.1",
    "2.4.0": "2.4.0-tgi2.4.0-gpu-py311-cu124-ubuntu22.04-v2.2",
    "2.3.1": "2.4.0-tgi2.3.1-gpu-py311-cu124-ubuntu22.04",
}
DEFAULT_TGI_VERSION = "3.3.6"


def check_region(region: str) -> str:
    """`region` if the DLC is published there; ValidationError naming the known ones otherwise."""
    if region not in DLC_ACCOUNTS:
        known = ", ".join(sorted(DLC_ACCOUNTS))
        raise ValidationError(
            f"unknown or unsupported AWS region {region!r} (the Hugging Face LLM DLC is published in: "
            f"{known}); give --region, or --image for your own container",
            param="platform.sagemaker.region",
        )
    return region


def domain(region: str) -> str:
    """The AWS DNS suffix of the region's partition."""
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def tgi_version(asked: str | None) -> str:
    """An exact TGI version of the table: `asked` (`3.3` means its newest patch) or the default."""
    if asked is None:
        return DEFAULT_TGI_VERSION
    if asked in TGI_TAGS:
        return asked
    patches = sorted(
        (v for v in TGI_TAGS if v.startswith(f"{asked}.")),
        key=lambda v: tuple(int(p) for p in v.split(".")),
    )
    if patches:
        return patches[-1]
    raise ValidationError(
        f"unknown TGI version {asked!r}; the DLC table has {', '.join(TGI_TAGS)} "
        "(or give --image with the URI of the image you want)",
        param="platform.sagemaker.tgi_version",
    )


def dlc_image(region: str, version: str | None = None) -> str:
    """The HF LLM DLC image URI for `region` and TGI `version` (default: DEFAULT_TGI_VERSION)."""
    account = DLC_ACCOUNTS[check_region(region)]
    tag = TGI_TAGS[tgi_version(version)]
    return f"{account}.dkr.ecr.{region}.{domain(region)}/{REPOSITORY}:{tag}"


def runtime_url(region: str, endpoint: str, *, asynchronous: bool = False) -> str:
    """The SageMaker Runtime URL of an endpoint: InvokeEndpoint's, or InvokeEndpointAsync's."""
    route = "async-invocations" if asynchronous else "invocations"
    return f"https://runtime.sagemaker.{region}.{domain(region)}/endpoints/{endpoint}/{route}"


def log_group(endpoint: str) -> str:
    """The CloudWatch log group SageMaker writes an endpoint's container logs to."""
    return f"/aws/sagemaker/Endpoints/{endpoint}"
