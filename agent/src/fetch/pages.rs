//! What arrives in pages: a chunk index of any size (each page at most one payload; the first
//! page's header bounds the whole) and a desired state too large for one stream item.

use bytes::Bytes;
use cardeploy_chunks::{ChunkIndex, Digest, INDEX_HEADER_BYTES};
use cardeploy_link::Requester;
use cardeploy_protocol::{
    self as protocol, DesiredPageRequest, DesiredState, IndexRequest, MAX_DESIRED_BYTES,
    PagedDesired, route,
};

use super::Fetcher;
use crate::Error;

impl Fetcher {
    /// An index from the local cache (checked against its id) or from the twin.
    pub(super) async fn index(&self, link: &Requester, id: &Digest) -> Result<ChunkIndex, Error> {
        let path = self.indexes.join(id.hex());
        if let Ok(bytes) = std::fs::read(&path) {
            match ChunkIndex::decode_expecting(&bytes, id, self.max_artifact) {
                Ok(index) => return Ok(index),
                Err(e) => tracing::warn!(
                    "cached index {} is unusable ({e}); fetching it again",
                    path.display()
                ),
            }
        }
        let bytes = self.index_pages(link, id).await?;
        let index = ChunkIndex::decode_expecting(&bytes, id, self.max_artifact)?;
        cardeploy_chunks::atomic::write(&path, &bytes, cardeploy_chunks::atomic::PUBLIC)?;
        Ok(index)
    }

    /// An index's encoding from the twin, page by page: the first page's header says how long
    /// the whole is (and that the artifact it describes is within the car's limit) before more
    /// is asked for, so an index of any size arrives and none larger than announced is kept.
    async fn index_pages(&self, link: &Requester, id: &Digest) -> Result<Vec<u8>, Error> {
        let page = |offset: u64| {
            let request = protocol::encode(&IndexRequest {
                index: id.hex(),
                offset: (offset > 0).then_some(offset),
            });
            link.request_response(route::ARTIFACT_INDEX, Bytes::from(request))
        };
        let mut bytes = page(0).await?.to_vec();
        if bytes.len() < INDEX_HEADER_BYTES {
            return Err(cardeploy_chunks::Error::IndexMalformed(format!(
                "the first page of index {id} is {} bytes, shorter than a header",
                bytes.len()
            ))
            .into());
        }
        let total = ChunkIndex::encoded_len(&bytes, self.max_artifact)?;
        let total = usize::try_from(total).map_err(|_| {
            cardeploy_chunks::Error::IndexMalformed(format!("index {id} of {total} bytes"))
        })?;
        bytes.reserve(total.saturating_sub(bytes.len()));
        while bytes.len() < total {
            let next = page(bytes.len() as u64).await?;
            if next.is_empty() || bytes.len() + next.len() > total {
                return Err(cardeploy_chunks::Error::IndexMalformed(format!(
                    "index {id}: a page of {} bytes at offset {} does not fit its {total}-byte length",
                    next.len(),
                    bytes.len()
                ))
                .into());
            }
            bytes.extend_from_slice(&next);
        }
        if bytes.len() > total {
            return Err(cardeploy_chunks::Error::IndexMalformed(format!(
                "index {id}: {} bytes arrived for a {total}-byte encoding",
                bytes.len()
            ))
            .into());
        }
        Ok(bytes)
    }
}

/// A `car.desired` stream item: the desired state itself, or — when it is too large for one
/// payload — read page by page and checked against the digest the item announced.
pub(crate) async fn desired_item(link: &Requester, item: &[u8]) -> Result<DesiredState, Error> {
    let whole = match protocol::decode::<DesiredState>("desired state", item) {
        Ok(state) => return Ok(state),
        Err(e) => e,
    };
    let Ok(PagedDesired { paged }) = protocol::decode::<PagedDesired>("desired state", item) else {
        return Err(Error::Protocol {
            what: "car.desired",
            source: whole,
        });
    };
    if paged.size > MAX_DESIRED_BYTES {
        return Err(Error::TwinAnswer(format!(
            "a desired state of {} bytes is announced; this agent reads at most {MAX_DESIRED_BYTES}",
            paged.size
        )));
    }
    let size = paged.size as usize;
    let mut bytes = Vec::with_capacity(size);
    while bytes.len() < size {
        let request = protocol::encode(&DesiredPageRequest {
            digest: paged.digest.clone(),
            offset: bytes.len() as u64,
        });
        let page = link
            .request_response(route::CAR_DESIRED_PAGE, Bytes::from(request))
            .await?;
        if page.is_empty() || bytes.len() + page.len() > size {
            return Err(Error::TwinAnswer(format!(
                "a page of {} bytes at offset {} does not fit the announced {size}-byte desired state",
                page.len(),
                bytes.len()
            )));
        }
        bytes.extend_from_slice(&page);
    }
    if Digest::of(&bytes).hex() != paged.digest {
        return Err(Error::TwinAnswer(format!(
            "the pages of desired state {} do not hash to it",
            paged.digest
        )));
    }
    protocol::decode("desired state", &bytes).map_err(|source| Error::Protocol {
        what: "car.desired.page",
        source,
    })
}
