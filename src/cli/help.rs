//! The `--help` texts, written out whole so they read like pcocc's (click's) layout rather
//! than clap's: a `Usage:` line, an indented description, `Options:` and `Commands:`.
//! Where we behave differently from pcocc on purpose, the text says so.
//!
//! Each constant is a clap help template without placeholders, so clap prints it as is.

pub const PCOCC: &str = "\
Usage: pcocc [OPTIONS] COMMAND [ARGS]...

  Manage pcocc VM image repositories (pcocc-imagefs).

Options:
  --config FILE  Read the repositories from FILE instead of the user and
                 system repos.yaml
  -v, --verbose  Log what is done on stderr (twice for more detail)
  --version      Show the version and exit.
  -h, --help     Show this message and exit.

Commands:
  image  List and manage images
";

pub const IMAGE: &str = "\
Usage: pcocc image [OPTIONS] COMMAND [ARGS]...

  List and manage images

Options:
  -h, --help  Show this message and exit.

Commands:
  copy    Copy an image from one repository to another
  delete  Delete an image from a repository
  export  Export an image from a repository
  import  Import an image to a repository
  list    List images in repositories
  repo    List and manage image repositories
  resize  Resize an image in a repository
  show    Show details for an image
";

pub const LIST: &str = "\
Usage: pcocc image list [OPTIONS] [REGEX]

  List images in configured repositories.

  If REGEX is provided, only images whose name match the provided regular
  expression are shown. REGEX uses the syntax of Rust's regex crate, which is
  Python's without look-around and backreferences.

  Metadata files that cannot be read are skipped with a warning instead of
  failing the whole listing.

Options:
  -R, --repo TEXT  Restrict image list to a repository
  -h, --help       Show this message and exit.
";

pub const SHOW: &str = "\
Usage: pcocc image show [OPTIONS] IMAGE

  Show details for an image

  Images in repositories are specified with URIs of the form
  [REPO:]IMAGE[@REVISION]

  Without REPO, the repositories are searched by order of priority, and an
  empty REPO (':IMAGE') names the default repository; without REVISION, the
  highest revision is shown. The revision table lists every revision of the
  image in revision order; SIZE is the size of the layer that the revision
  adds.

Options:
  -h, --help  Show this message and exit.
";

pub const COPY: &str = "\
Usage: pcocc image copy [OPTIONS] SOURCE DEST

  Copy an image from a repository to another image in a repository.

  Images in repositories are specified with URIs of the form
  [REPO:]IMAGE[@REVISION]

  The destination image name must not already be used in the destination
  repository and the destination revision is ignored since a copy operation
  creates the first revision of a new image.

Options:
  -h, --help  Show this message and exit.
";

pub const DELETE: &str = "\
Usage: pcocc image delete [OPTIONS] IMAGE

  Delete an image from a repository

  Images in repositories are specified with URIs of the form
  [REPO:]IMAGE[@REVISION]

  If a revision is specified, only the specified revision is deleted,
  otherwise all revisions of the image are deleted.

  Without REPO, the image is deleted from the first repository, by order of
  priority, that holds it (pcocc looked in the default repository only). The
  layers stay until 'pcocc image repo gc' finds them unused.

Options:
  -h, --help  Show this message and exit.
";

pub const RESIZE: &str = "\
Usage: pcocc image resize [OPTIONS] IMAGE NEW_SZ

  Resize an image in a repository

  Images in repositories are specified with URIs of the form
  [REPO:]IMAGE[@REVISION]

  A new image revision is created with the new image size.

  The new revision holds the layers of the given (or latest) revision plus an
  empty layer of size NEW_SZ on top: a smaller size shrinks the disk. NEW_SZ is
  in bytes or with a unit (k, M, G, T, P; 1.5G works). Without REPO, the
  repositories are searched by order of priority and the new revision is
  written where the image is. It is always the image's next revision, also
  when an older one is resized (pcocc overwrote the one after it).

  Example usage:
         pcocc image resize myimg 20G

Options:
  -h, --help  Show this message and exit.
";

pub const REPO: &str = "\
Usage: pcocc image repo [OPTIONS] COMMAND [ARGS]...

  List and manage image repositories

Options:
  -h, --help  Show this message and exit.

Commands:
  gc    Cleanup unnecessary data in a repository
  list  List pcocc image repositories
";

pub const REPO_LIST: &str = "\
Usage: pcocc image repo list [OPTIONS]

  List pcocc image repositories

Options:
  -h, --help  Show this message and exit.
";

pub const REPO_GC: &str = "\
Usage: pcocc image repo gc [OPTIONS] REPO

  Cleanup unnecessary data in a repository

  Removes the layers that no revision of REPO uses and the scratch files left
  in REPO/.tmp. Unlike pcocc, it keeps those younger than an hour, since they
  may belong to an import still running on another host.

Options:
  --grace DURATION  Keep what is younger than DURATION (seconds, or a number
                    followed by s, m, h or d; default 1h)
  -h, --help        Show this message and exit.
";

// pcocc v0.7.5 dropped the KIND argument that its man page still shows; both forms are
// accepted.

pub const IMPORT: &str = "\
Usage: pcocc image import [OPTIONS] [KIND] SOURCE DEST

  Import the source image file to an image in the destination repository.

  Images in repositories are specified with URIs of the form
  [REPO:]IMAGE[@REVISION].

  The destination image name must not already be used in the destination
  repository and the revision is ignored since the import operation creates
  the first revision of a new image.

  The format of SOURCE (raw, qcow2, qed, vdi, vpc or vmdk) is taken from -t,
  a FMT: prefix (qcow2:disk), the file suffix or the content, which must not
  contradict it; a file of unknown content is imported as raw. A file that is
  not a valid image of its format is refused and nothing is stored.

  KIND, from older pcocc releases, may only be 'vm' and can be left out.

Options:
  -t, --fmt TEXT  Force source image format
  -h, --help      Show this message and exit.
";

pub const EXPORT: &str = "\
Usage: pcocc image export [OPTIONS] [KIND] SOURCE DEST

  Export the source image from a repository to the destination file.

  Images in repositories are specified with URIs of the form
  [REPO:]IMAGE[@REVISION]

  The format of DEST (raw, qcow2, qed, vdi, vpc or vmdk) is taken from -t, a
  FMT: prefix (vmdk:out) or the file suffix, else raw. Unallocated areas stay
  holes in DEST. An existing DEST of the same format is replaced, one of
  another format is not.

  KIND, from older pcocc releases, may only be 'vm' and can be left out.

Options:
  -t, --fmt TEXT  Force destination image format
  -h, --help      Show this message and exit.
";
