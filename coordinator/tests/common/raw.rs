//! Raw gRPC calls to any method of either API, enumerated from the compiled descriptors
//! (`veraltheim_proto::FILE_DESCRIPTOR_SET`): the hostile probe and the authentication test send
//! arbitrary bytes to every RPC, including ones added after they were written.

use bytes::{Buf, BufMut, Bytes};
use prost_reflect::{DescriptorPool, MessageDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A codec that moves bytes as they are.
#[derive(Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One method of one service, as the descriptors declare it.
pub struct Method {
    /// `/package.Service/Method`.
    pub path: String,
    /// `Method`.
    pub name: String,
    pub input: MessageDescriptor,
    pub client_streaming: bool,
    pub server_streaming: bool,
}

/// Every method of every service of both APIs.
pub fn methods() -> Vec<Method> {
    let pool = DescriptorPool::decode(veraltheim_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for service in pool.services() {
        for m in service.methods() {
            out.push(Method {
                path: format!("/{}/{}", service.full_name(), m.name()),
                name: m.name().to_string(),
                input: m.input(),
                client_streaming: m.is_client_streaming(),
                server_streaming: m.is_server_streaming(),
            });
        }
    }
    out
}
