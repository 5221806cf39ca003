"""`/v1/models`: the models live workers serve."""

from __future__ import annotations

import time

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
    return ModelList(data=[ModelObject(id=name, created=now) for name in sorted(live)])


@router.get("/{model:path}", response_model=ModelObject)
async def get_model(model: str, state: Gateway = Depends(gateway)) -> ModelObject:
    live = await run_in_threadpool(state.client.models)
    if model not in live:
        raise not_found("model", model)
    return ModelObject(id=model, created=int(time.time()))
