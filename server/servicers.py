"""Thin gRPC servicers: protobuf -> service call -> protobuf.

Each method checks the caller may act on the request's tenant, converts,
calls :class:`GalleryService`, converts back. Errors are mapped by
:func:`veilface.server.errors_map.mapped`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from veilface.errors import InvalidArgument
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.proto.v1 import veilface_pb2_grpc as pb_grpc
from veilface.server.auth import require_admin, require_scope, require_tenant
from veilface.server.convert import (
    bin_scores_to_proto,
    bin_summary_to_proto,
    bulk_to_proto,
    enroll_to_proto,
    fetched_bin_to_proto,
    key_info_to_proto,
    preselect_to_proto,
    reservation_to_proto,
    search_mode_from_proto,
    slot_map_to_proto,
    staged_template_to_proto,
    subject_bin_to_proto,
    verify_to_proto,
)
from veilface.server.enrollment import BulkChunk
from veilface.server.errors_map import mapped
from veilface.server.service import GalleryService
from veilface.server.store.records import TokenRecord
from veilface.server.tokens import Scope, TokenIndex, TokenService

Ctx: TypeAlias = grpc.aio.ServicerContext

_SCOPE_TO_PB = {
    Scope.QUERY: pb.TOKEN_SCOPE_QUERY,
    Scope.ENROLL: pb.TOKEN_SCOPE_ENROLL,
    Scope.MANAGE: pb.TOKEN_SCOPE_MANAGE,
}
_SCOPE_FROM_PB = {v: k.value for k, v in _SCOPE_TO_PB.items()}


def token_info_to_proto(rec: TokenRecord) -> pb.TokenInfo:
    """A token's public description (never its hash or secret)."""
    return pb.TokenInfo(
        token_id=rec.token_id,
        name=rec.name,
        scopes=[_SCOPE_TO_PB[Scope(s)] for s in rec.scopes],
        created_at=rec.created_at,
        revoked_at=rec.revoked_at or 0.0,
    )


class TenantsServicer(pb_grpc.TenantsServicer):
    def __init__(self, service: GalleryService, tokens: TokenIndex) -> None:
        self.service = service
        self.tokens = tokens

    @mapped
    async def CreateTenant(self, request: pb.CreateTenantRequest, context: Ctx) -> pb.CreateTenantResponse:
        require_admin()
        issued = await self.service.create_tenant(request.tenant_id)
        self.tokens.add(issued.record)
        return pb.CreateTenantResponse(
            tenant_id=request.tenant_id,
            api_token=issued.secret,
            token=token_info_to_proto(issued.record),
        )

    @mapped
    async def RegisterKey(self, request: pb.RegisterKeyRequest, context: Ctx) -> pb.RegisterKeyResponse:
        require_tenant(request.tenant_id)
        view = await self.service.register_key(request.tenant_id, request.key_id, request.public_context)
        return pb.RegisterKeyResponse(key=key_info_to_proto(view))

    @mapped
    async def RegisterCenter(self, request: pb.RegisterCenterRequest, context: Ctx) -> pb.RegisterKeyResponse:
        require_tenant(request.tenant_id)
        view = await self.service.register_center(
            request.tenant_id, request.key_id, list(request.center_ciphertexts)
        )
        return pb.RegisterKeyResponse(key=key_info_to_proto(view))

    @mapped
    async def DescribeTenant(
        self, request: pb.DescribeTenantRequest, context: Ctx
    ) -> pb.DescribeTenantResponse:
        require_tenant(request.tenant_id)
        views = await self.service.describe(request.tenant_id)
        return pb.DescribeTenantResponse(
            tenant_id=request.tenant_id, keys=[key_info_to_proto(v) for v in views]
        )


class EnrollmentServicer(pb_grpc.EnrollmentServicer):
    def __init__(self, service: GalleryService) -> None:
        self.service = service

    @mapped
    async def ReserveSlots(self, request: pb.ReserveSlotsRequest, context: Ctx) -> pb.ReserveSlotsResponse:
        require_tenant(request.tenant_id)
        res = await self.service.enrollment.reserve(request.tenant_id, request.key_id, request.label, request.count)
        return reservation_to_proto(res, self.service.settings.reservation_ttl_s)

    @mapped
    async def Enroll(
        self, request_iterator: AsyncIterator[pb.EnrollRequest], context: Ctx
    ) -> pb.EnrollResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidArgument("empty enrollment stream")
        require_tenant(first.tenant_id)

        async def chunks() -> AsyncIterator[list[bytes]]:
            yield list(first.ciphertexts)
            async for msg in request_iterator:
                if msg.reservation_id or msg.handles or msg.staged_id:
                    raise InvalidArgument("only the first message names the reservation and handles")
                yield list(msg.ciphertexts)

        res = await self.service.enrollment.enroll(
            first.tenant_id,
            first.key_id,
            first.reservation_id,
            list(first.handles),
            chunks(),
            first.staged_id,
        )
        return enroll_to_proto(res)

    @mapped
    async def BulkEnroll(
        self, request_iterator: AsyncIterator[pb.BulkEnrollChunk], context: Ctx
    ) -> pb.BulkEnrollResponse:
        from veilface.server.auth import current_principal

        tenant = current_principal().tenant_id or ""

        async def chunks() -> AsyncIterator[BulkChunk]:
            async for c in request_iterator:
                require_tenant(c.tenant_id)
                if c.replaces or c.renew_handles:
                    require_scope(Scope.MANAGE, "a bulk stream that replaces bins (re-pack, rotation)")
                yield BulkChunk(
                    c.tenant_id,
                    c.key_id,
                    c.label,
                    list(c.handles),
                    list(c.slots),
                    c.ciphertexts,  # not copied: packed once for the store
                    [(r.bin_id, r.version) for r in c.replaces],
                    renew_handles=c.renew_handles,
                    total_bins=c.total_bins,
                )
            # A cut stream can end like a clean one. If gRPC already knows the
            # call is cancelled it is not one (the declared total_bins is the
            # check that does not race with gRPC's cancellation).
            if context.cancelled():
                raise asyncio.CancelledError("the bulk stream was cancelled")

        return bulk_to_proto(await self.service.enrollment.bulk_enroll(chunks(), tenant))

    @mapped
    async def FetchSubjectBin(
        self, request: pb.FetchSubjectBinRequest, context: Ctx
    ) -> pb.FetchSubjectBinResponse:
        require_tenant(request.tenant_id)
        found = await self.service.enrollment.fetch_subject_bin(request.tenant_id, request.handle)
        return subject_bin_to_proto(found)

    @mapped
    async def DeleteSubject(self, request: pb.DeleteSubjectRequest, context: Ctx) -> pb.DeleteSubjectResponse:
        require_tenant(request.tenant_id)
        version = await self.service.enrollment.delete_subject(
            request.tenant_id,
            request.handle,
            request.bin_id,
            request.bin_version,
            list(request.ciphertexts),
        )
        return pb.DeleteSubjectResponse(bin_id=request.bin_id, bin_version=version)

    @mapped
    async def ListBins(self, request: pb.ListBinsRequest, context: Ctx) -> pb.ListBinsResponse:
        require_tenant(request.tenant_id)
        found = await self.service.enrollment.list_key_bins(request.tenant_id, request.key_id)
        return pb.ListBinsResponse(bins=[bin_summary_to_proto(b) for b in found])

    @mapped
    async def FetchBin(self, request: pb.FetchBinRequest, context: Ctx) -> pb.FetchBinResponse:
        require_tenant(request.tenant_id)
        found = await self.service.enrollment.fetch_bin(request.tenant_id, request.bin_id)
        return fetched_bin_to_proto(found)

    @mapped
    async def EnrollStaged(self, request: pb.EnrollStagedRequest, context: Ctx) -> pb.EnrollStagedResponse:
        require_tenant(request.tenant_id)
        staged_id = await self.service.enrollment.enroll_staged(
            request.tenant_id, request.key_id, request.label, request.handle, request.ciphertext
        )
        return pb.EnrollStagedResponse(staged_id=staged_id)

    @mapped
    async def FetchStaged(self, request: pb.FetchStagedRequest, context: Ctx) -> pb.FetchStagedResponse:
        require_tenant(request.tenant_id)
        found = await self.service.enrollment.fetch_staged(request.tenant_id, request.key_id, request.limit)
        return pb.FetchStagedResponse(staged=[staged_template_to_proto(r) for r in found])


class PhotosServicer(pb_grpc.PhotosServicer):
    def __init__(self, service: GalleryService) -> None:
        self.service = service

    @mapped
    async def UploadPhoto(self, request: pb.UploadPhotoRequest, context: Ctx) -> pb.UploadPhotoResponse:
        require_tenant(request.tenant_id)
        photo_id = await self.service.upload_photo(
            request.tenant_id,
            request.handle,
            request.sealed_photo,
            request.protection,
            replaces=request.replaces,
        )
        return pb.UploadPhotoResponse(photo_id=photo_id)

    @mapped
    async def ListPhotos(self, request: pb.ListPhotosRequest, context: Ctx) -> pb.ListPhotosResponse:
        require_tenant(request.tenant_id)
        return pb.ListPhotosResponse(
            photo_ids=await self.service.list_photos(request.tenant_id, request.handle)
        )

    @mapped
    async def FetchPhoto(self, request: pb.FetchPhotoRequest, context: Ctx) -> pb.FetchPhotoResponse:
        require_tenant(request.tenant_id)
        handle, sealed, protection = await self.service.fetch_photo(request.tenant_id, request.photo_id)
        return pb.FetchPhotoResponse(
            photo_id=request.photo_id, handle=handle, sealed_photo=sealed, protection=protection
        )


class IdentificationServicer(pb_grpc.IdentificationServicer):
    def __init__(self, service: GalleryService) -> None:
        self.service = service

    @mapped
    async def Preselect(self, request: pb.PreselectRequest, context: Ctx) -> pb.ScoresResponse:
        require_tenant(request.tenant_id)
        mode = search_mode_from_proto(request.mode)  # the one check of the mode
        res = await self.service.identification.preselect(
            request.tenant_id,
            request.key_id,
            mode,
            list(request.labels),
            list(request.probe_ciphertexts),
            exhaustive=request.exhaustive,
        )
        return preselect_to_proto(res)

    @mapped
    async def ScoreCandidates(self, request: pb.ScoreCandidatesRequest, context: Ctx) -> pb.ScoresResponse:
        require_tenant(request.tenant_id)
        scores = await self.service.identification.score_candidates(
            request.tenant_id,
            request.key_id,
            [(c.bin_id, list(c.slots)) for c in request.candidates],
            list(request.probe_ciphertexts),
            request.query_id,
        )
        return pb.ScoresResponse(bins=[bin_scores_to_proto(b) for b in scores])

    @mapped
    async def Verify(self, request: pb.VerifyRequest, context: Ctx) -> pb.VerifyResponse:
        require_tenant(request.tenant_id)
        res = await self.service.identification.verify(
            request.tenant_id, request.key_id, request.handle, list(request.probe_ciphertexts)
        )
        return verify_to_proto(request.key_id, res)

    @mapped
    async def FetchSlotMaps(
        self, request: pb.FetchSlotMapsRequest, context: Ctx
    ) -> pb.FetchSlotMapsResponse:
        require_tenant(request.tenant_id)
        maps = await self.service.identification.slot_maps(
            request.tenant_id, request.key_id, [(b.bin_id, b.version) for b in request.known]
        )
        return pb.FetchSlotMapsResponse(maps=[slot_map_to_proto(m) for m in maps])


class TokensServicer(pb_grpc.TokensServicer):
    """A tenant's API tokens; a manage token of the tenant or the admin (server/auth.py)."""

    def __init__(self, tokens: TokenService) -> None:
        self.tokens = tokens

    @mapped
    async def CreateToken(self, request: pb.CreateTokenRequest, context: Ctx) -> pb.CreateTokenResponse:
        require_tenant(request.tenant_id, allow_admin=True)
        scopes = [_SCOPE_FROM_PB.get(s, "unspecified") for s in request.scopes]
        issued = await self.tokens.create(request.tenant_id, request.name, scopes)
        return pb.CreateTokenResponse(token=token_info_to_proto(issued.record), api_token=issued.secret)

    @mapped
    async def ListTokens(self, request: pb.ListTokensRequest, context: Ctx) -> pb.ListTokensResponse:
        require_tenant(request.tenant_id, allow_admin=True)
        found = await self.tokens.list(request.tenant_id, include_revoked=request.include_revoked)
        return pb.ListTokensResponse(tokens=[token_info_to_proto(r) for r in found])

    @mapped
    async def RevokeToken(self, request: pb.RevokeTokenRequest, context: Ctx) -> pb.RevokeTokenResponse:
        require_tenant(request.tenant_id, allow_admin=True)
        rec = await self.tokens.revoke(request.tenant_id, request.token_id)
        return pb.RevokeTokenResponse(token=token_info_to_proto(rec))


__all__: list[Any] = [
    "EnrollmentServicer",
    "IdentificationServicer",
    "PhotosServicer",
    "TenantsServicer",
    "TokensServicer",
]
