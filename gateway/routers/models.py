"""`/v1/models`: the models live workers serve."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from gateway.bodies import ModelList, ModelObject
from gateway.errors import not_found
from gateway.state import Gateway, gateway, owner

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(owner)])


@router.get("", response_model=ModelList)
async def list_models(state: Gateway = Depends(gateway)) -> ModelList:
    live = await run_in_threadpool(state.client.models)
    now = int(time.time())
    return ModelList(data=[_model(name, live[name], now) for name in sorted(live)])


@router.get("/{model:path}", response_model=ModelObject)
async def get_model(model: str, state: Gateway = Depends(gateway)) -> ModelObject:
    live = await run_in_threadpool(state.client.models)
    if model not in live:
        raise not_found("model", model)
    return _model(model, live[model], int(time.time()))


def _model(name: str, workers: list[dict[str, Any]], now: int) -> ModelObject:
    """The model object of a served name, with the registered versions its workers loaded."""
    versions = {f"models:/{w['model_name']}/{w['model_version']}" for w in workers if w.get("model_version")}
    return ModelObject(id=name, created=now, model_versions=sorted(versions))
